"""`difflab.load` on users' diffusers folders (issue 16): ε / v / sample prediction, flow matching (finding 6),
torch_dtype and variants (finding 2, load side), identity by content across copies and dtypes (finding 7), and a
one-line ModelFormatError for each layout difflab does not read."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import difflab
from difflab.core.errors import AddonMismatchError, ModelFormatError
from difflab.models import check_base_model
from difflab.nets import MLP

diffusers = pytest.importorskip("diffusers")
from difflab.interop.diffusers.tiny import save_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def folders(tiny_pipeline):
    """The shared tiny pipelines: pixel DDPM models of each prediction type, a flow model, a text-to-image one."""
    made = {p: tiny_pipeline("pixel", prediction_type=p) for p in ("epsilon", "v_prediction", "sample")}
    return {**made, "flow": tiny_pipeline("flow"), "sd": tiny_pipeline("text_to_image")}


def fresh_copy(folder, tmp_path, name: str = "copy"):
    return shutil.copytree(folder, tmp_path / name)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@torch.no_grad()
def test_each_prediction_type_gives_x0_on_the_ddpm_table(folders, prediction_type):
    model = difflab.load(folders[prediction_type])
    pipe = diffusers.DDPMPipeline.from_pretrained(folders[prediction_type], use_safetensors=True)
    a_bar = pipe.scheduler.alphas_cumprod.double()
    t = 600                                                           # an exact table entry: no interpolation
    sigma = float(((1 - a_bar[t]) / a_bar[t]).sqrt())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * (1 + sigma)
    x_vp = x * float(a_bar[t].sqrt())                                 # x_t = sqrt(ᾱ)·x_σ
    out = pipe.unet(x_vp, torch.full((2,), float(t))).sample.double()
    x0 = {"epsilon": (x_vp.double() - (1 - a_bar[t]).sqrt() * out) / a_bar[t].sqrt(),   # DDPM eq. (15)
          "v_prediction": a_bar[t].sqrt() * x_vp.double() - (1 - a_bar[t]).sqrt() * out,   # Salimans & Ho
          "sample": out}[prediction_type]
    # float32 network and state against a float64 reference built from the same float32 output
    torch.testing.assert_close(model(x, torch.full((2,), sigma)).double(), x0, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_flow_matching_folder_is_a_flow_denoiser_matching_diffusers_euler_loop(folders):
    """Finding 6: a FlowMatchEulerDiscreteScheduler folder loaded silently as a DDPM ε model (later: refused)."""
    model = difflab.load(folders["flow"])
    assert isinstance(model, difflab.FlowDenoiser)
    # σ = t/(1 − t) over the scheduler's float32 table t ∈ [0.001, 0.999] (t = 1 is σ = ∞): float32 round-off
    assert model.sigma_min == pytest.approx(0.001 / 0.999, rel=1e-4)
    assert model.sigma_max == pytest.approx(0.999 / 0.001, rel=1e-4)
    pipe = diffusers.DDPMPipeline.from_pretrained(folders["flow"], use_safetensors=True)
    scheduler = pipe.scheduler
    t_grid = torch.tensor([0.95, 0.8, 0.6, 0.35, 0.15, 0.04])
    scheduler.set_timesteps(sigmas=t_grid.tolist())                  # shift 1: the t's as given, then 0
    x_t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x_start = x_t.clone()
    for timestep in scheduler.timesteps:                             # diffusers: x_t ← x_t + (t' − t)·v
        x_t = scheduler.step(pipe.unet(x_t, timestep).sample, timestep, x_t).prev_sample
    sigmas = torch.cat([t_grid.double() / (1 - t_grid.double()), torch.zeros(1, dtype=torch.float64)])
    x_sigma = x_start / (1 - t_grid[0])                               # x_σ = x_t/(1 − t), σ = t/(1 − t)
    out = difflab.sample(model, x_sigma, sigmas, solver="euler")     # ends at σ = 0, where x_σ = x_t
    # Euler is the same map in t and in σ (conventions.md (11)); only float32 round-off differs
    torch.testing.assert_close(out, x_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@torch.no_grad()
def test_float32_model_samples_any_floating_state_and_loads_in_any_dtype(folders, dtype):
    """Finding 2 (load side): no torch_dtype, and a bf16 / fp16 / float64 x was a bare dtype RuntimeError."""
    model = difflab.load(folders["epsilon"])
    sigmas = difflab.get_sigmas("karras", 4, model.sigma_min, 10.0)
    x = difflab.seeded_noise(range(2), model.data_shape, float(sigmas[0]))
    out = difflab.sample(model, x.to(dtype), sigmas, solver="heun")
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    low = difflab.load(folders["epsilon"], torch_dtype=dtype)
    assert {p.dtype for p in low.parameters()} == {dtype}
    out = difflab.sample(low, x, sigmas, solver="heun")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_fingerprint_names_the_stored_weights_whatever_the_folder_and_dtype(folders, tmp_path):
    """Finding 7: the fingerprint held the UNet config's _name_or_path, so a copied folder was another model."""
    copy = fresh_copy(folders["sd"], tmp_path)
    names = {difflab.fingerprint(difflab.load(folder, torch_dtype=dtype))
             for folder in (folders["sd"], copy) for dtype in (None, torch.float16, torch.bfloat16)}
    assert len(names) == 1
    assert difflab.fingerprint(difflab.load(folders["epsilon"])) != difflab.fingerprint(
        difflab.load(folders["v_prediction"]))                        # same UNet weights? no: other seed/table
    other = save_tiny_pipeline(tmp_path / "other", kind="text_to_image", seed=1)
    assert difflab.fingerprint(difflab.load(other)) not in names
    guided = difflab.CFGDenoiser(difflab.load(copy, torch_dtype=torch.bfloat16), w=2.0)
    assert difflab.fingerprint(guided) == difflab.fingerprint(difflab.CFGDenoiser(difflab.load(folders["sd"]), w=2.0))


def test_an_addon_fitted_on_one_copy_accepts_the_other_in_bfloat16(folders, tmp_path):
    """Finding 7: an add-on was bound to the model's path."""
    recorded = difflab.fingerprint(difflab.load(folders["flow"]))
    copy = fresh_copy(folders["flow"], tmp_path)
    check_base_model("AMED predictor", recorded, difflab.load(copy, torch_dtype=torch.bfloat16), "refit")
    check_base_model("AMED predictor", recorded, copy, "refit")      # a folder is loaded and named the same way
    with pytest.raises(AddonMismatchError):
        check_base_model("AMED predictor", recorded, folders["epsilon"], "refit")


def test_a_difflab_folder_loads_in_another_dtype_under_the_same_fingerprint(tmp_path):
    model = difflab.EDMDenoiser(MLP(dim=2, hidden=16, depth=1, zero_init_output=False), data_shape=(2,))
    model.save(tmp_path / "edm")
    low = difflab.load(tmp_path / "edm", torch_dtype=torch.bfloat16)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    assert difflab.fingerprint(low) == difflab.fingerprint(difflab.load(tmp_path / "edm")) == difflab.fingerprint(model)
    with pytest.raises(ModelFormatError, match="variant"):
        difflab.load(tmp_path / "edm", variant="fp16")


def test_a_variant_is_read_and_a_missing_one_named(folders, tmp_path):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folders["sd"], torch_dtype=torch.float16,
                                                             use_safetensors=True)
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16", safe_serialization=True)
    model = difflab.load(tmp_path / "fp16", variant="fp16", torch_dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    with pytest.raises(ModelFormatError, match=r"diffusion_pytorch_model\.safetensors.*found.*fp16") as err:
        difflab.load(tmp_path / "fp16")
    assert "\n" not in str(err.value)
    with pytest.raises(ModelFormatError, match=r"variant 'bf16'.*diffusion_pytorch_model\.safetensors"):
        difflab.load(folders["sd"], variant="bf16")


def _edit_json(file, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


@pytest.mark.parametrize("damage, message", [
    ("no vae", r"no \['vae'\]"),
    ("no text encoder", r"no \['text_encoder'\]"),
    ("unknown prediction type", "prediction_type='flow'"),
    ("unknown unet class", "'UNet3DConditionModel'"),
    ("a second text encoder", "text_encoder_2"),
    ("a transformer", "transformer"),
    ("pickled weights only", r"\.bin"),
])
@pytest.mark.reliability("configs")
def test_an_unknown_layout_is_one_model_format_error(folders, tmp_path, damage, message):
    folder = fresh_copy(folders["sd"], tmp_path)
    if damage == "no vae":
        shutil.rmtree(folder / "vae")
    elif damage == "no text encoder":
        shutil.rmtree(folder / "text_encoder")
    elif damage == "unknown prediction type":
        _edit_json(folder / "scheduler" / "scheduler_config.json", prediction_type="flow")
    elif damage == "unknown unet class":
        _edit_json(folder / "unet" / "config.json", _class_name="UNet3DConditionModel")
    elif damage == "a second text encoder":
        shutil.copytree(folder / "text_encoder", folder / "text_encoder_2")
    elif damage == "a transformer":
        (folder / "unet").rename(folder / "transformer")
    else:
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelFormatError, match=message) as err:
        difflab.load(folder)
    assert "\n" not in str(err.value)


@torch.no_grad()
def test_a_bfloat16_unet_sees_its_fractional_timestep_in_float32(folders):
    """bf16 holds 8 significant bits: a timestep near 999 rounded to bf16 moves by up to 2. diffusers embeds
    timesteps in float32, so the wrapper hands them over in float32 whatever the weights' dtype."""
    model = difflab.load(folders["epsilon"], torch_dtype=torch.bfloat16)
    seen = []
    handle = model.model.unet.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    sigma = torch.tensor([float(model.log_sigmas[-2].exp()) * 1.001])   # fractional timestep just under 999
    try:
        model(torch.zeros(1, *model.data_shape), sigma)
    finally:
        handle.remove()
    expected = float(model.sigma_to_t(sigma))
    assert seen[0].dtype == torch.float32
    assert float(seen[0]) == pytest.approx(expected, abs=1e-3)   # float32 round-off at 999: 6e-5
    assert abs(float(torch.tensor(expected).bfloat16()) - expected) > 1e-3   # what bf16 would have lost
