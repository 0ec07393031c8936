"""SuperDiff over prompts (`Components.over_prompts`) and over two separate diffusers pipelines, offline.

A text-to-image model is anything with `encode_prompts(list[str]) -> [P, tokens, dim]` whose forward takes
`encoder_hidden_states`: a stand-in built here (a tiny conditional UNet, prompts hashed to fixed embeddings),
and `difflab.load` on a tiny random Stable Diffusion folder where the loader supports it. Checks: AND's equal
log-density estimates, OR's shapes, one batched UNet call per step for 2 prompts + the null prompt, and
over_prompts being exactly over_conditions on the hand-encoded embeddings.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import difflab
from difflab import GaussianMixture, get_sigmas
from difflab.compose import Components, superdiff
from difflab.core.errors import ConfigError
from difflab.core.wrappers import VPDenoiser
from difflab.nets.diffusers_unet import DiffusersUNet
from difflab.sampling import PerSampleGenerator, seeded_noise

diffusers = pytest.importorskip("diffusers")

N = 3           # samples
STEPS = 3       # sampler steps (4 grid points)
PROMPTS = ["a cat", "a dog"]


class StandInTextModel(torch.nn.Module):
    """What `difflab.load` gives for a Stable Diffusion folder, reduced to the interface over_prompts reads:
    a conditional UNet denoiser on latents [1, 8, 8], each prompt a fixed random embedding [4, 8]."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval().requires_grad_(False)
        self.denoiser = VPDenoiser(DiffusersUNet(self.unet), diffusers.DDPMScheduler().alphas_cumprod)
        self.data_shape, self.sigma_min, self.sigma_max = (1, 8, 8), self.denoiser.sigma_min, self.denoiser.sigma_max
        self.encoded: list[list[str]] = []

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        self.encoded.append(list(prompts))
        return torch.stack([torch.randn(4, 8, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                            for p in prompts])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.clamp(-1, 1) + 1) / 2).repeat(1, 3, 1, 1)

    def forward(self, x, sigma, encoder_hidden_states):
        return self.denoiser(x, sigma, encoder_hidden_states=encoder_hidden_states)


def _loads_text_to_image() -> bool:
    try:
        from difflab.interop.diffusers import text_to_image  # noqa: F401  (may be absent)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def tiny_folders(tiny_pipeline):
    folders = {"pixel_a": tiny_pipeline("pixel", seed=0), "pixel_b": tiny_pipeline("pixel", seed=1)}
    if _loads_text_to_image():
        folders["sd_a"] = tiny_pipeline("text_to_image", seed=0)
        folders["sd_b"] = tiny_pipeline("text_to_image", seed=1)
    return folders


def _text_model(kind: str, tiny_folders, which: str = "a"):
    if kind == "stand-in":
        return StandInTextModel(seed=0 if which == "a" else 1)
    if f"sd_{which}" not in tiny_folders:
        pytest.skip("difflab.load does not load Stable Diffusion folders as text-to-image models yet")
    return difflab.load(tiny_folders[f"sd_{which}"])


@pytest.fixture(params=["stand-in", "tiny-pipeline"])
def text_model(request, tiny_folders):
    return _text_model(request.param, tiny_folders)


def _unet(model) -> torch.nn.Module:
    return next(m for m in model.modules() if isinstance(m, diffusers.UNet2DConditionModel))


def _run(model_or_components, components, mode: str = "and", sde: bool = True):
    """superdiff from fixed per-sample seeds; returns (result, rows of every UNet call)."""
    models = model_or_components if isinstance(model_or_components, list) else [model_or_components]
    sigmas = get_sigmas("karras", STEPS + 1, max(m.sigma_min for m in models), 10.0)
    rows = []
    handles = [_unet(m).register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
               for m in models]
    x = seeded_noise(range(N), tuple(models[0].data_shape), float(sigmas[0]))
    try:
        with torch.no_grad():
            result = superdiff(components, x, sigmas, mode=mode, sde=sde, generator=PerSampleGenerator(range(N)))
    finally:
        for handle in handles:
            handle.remove()
    return result, rows


@pytest.mark.parametrize("sde", [True, False], ids=["sde", "ode"])
def test_and_over_two_prompts_keeps_estimates_equal_in_one_batched_call_per_step(text_model, sde):
    components = Components.over_prompts(text_model, PROMPTS, w=1.5, negative_prompt="blurry")
    result, rows = _run(text_model, components, sde=sde)
    assert result.x.shape == (N, *text_model.data_shape) and torch.isfinite(result.x).all()
    assert result.log_q.shape == (N, 2) and torch.isfinite(result.log_q).all()
    assert rows == [3 * N] * STEPS                 # prompt 1, prompt 2 and the negative prompt in one call per step
    # AND keeps the two estimates equal (float32 network: to float32 round-off of the inner products)
    torch.testing.assert_close(result.log_q[:, 0], result.log_q[:, 1], rtol=1e-4, atol=1e-3)


def test_or_over_prompts_unguided_has_one_row_block_per_prompt(text_model):
    components = Components.over_prompts(text_model, ["a cat", "a dog", "a fox"])
    result, rows = _run(text_model, components, mode="or")
    assert result.x.shape == (N, *text_model.data_shape) and torch.isfinite(result.x).all()
    assert result.log_q.shape == (N, 3) and result.kappa.shape == (N, 3)
    torch.testing.assert_close(result.kappa.sum(1), torch.ones_like(result.kappa[:, 0]))   # a softmax
    assert rows == [3 * N] * STEPS                 # three prompts, no guidance: no null block
    images = text_model.decode(result.x)
    assert images.shape[:2] == (N, 3) and images.min() >= 0 and images.max() <= 1


def test_over_prompts_is_over_conditions_on_the_hand_encoded_embeddings(text_model):
    embeddings = text_model.encode_prompts([*PROMPTS, "blurry"])          # [3, tokens, dim]
    by_hand = Components.over_conditions(
        text_model, [{"encoder_hidden_states": embeddings[0:1]}, {"encoder_hidden_states": embeddings[1:2]}],
        w=2.0, uncond={"encoder_hidden_states": embeddings[2:3]})
    by_prompts = Components.over_prompts(text_model, PROMPTS, w=2.0, negative_prompt="blurry")
    expected, _ = _run(text_model, by_hand)
    result, _ = _run(text_model, by_prompts)
    assert torch.equal(result.x, expected.x) and torch.equal(result.log_q, expected.log_q)   # the same calls


def test_prompts_are_encoded_once_with_the_negative_prompt_last():
    model = StandInTextModel()
    components = Components.over_prompts(model, PROMPTS, w=1.0)
    assert model.encoded == [[*PROMPTS, ""]]         # diffusers' default negative prompt: the empty string
    _run(model, components)
    assert model.encoded == [[*PROMPTS, ""]]         # sampling encodes nothing more
    torch.testing.assert_close(components.uncond["encoder_hidden_states"], model.encode_prompts([""]))
    Components.over_prompts(model, PROMPTS)
    assert model.encoded[-1] == PROMPTS              # unguided: no null condition to encode


@pytest.mark.parametrize("kwargs, message", [
    ({"negative_prompt": "blurry"}, "give w too"),
    ({"prompts": []}, "list of prompt strings"),
    ({"prompts": ["a cat", 3]}, "list of prompt strings"),
])
def test_bad_prompt_arguments_are_config_errors(kwargs, message):
    kwargs = {"prompts": PROMPTS, **kwargs}
    with pytest.raises(ConfigError, match=message):
        Components.over_prompts(StandInTextModel(), **kwargs)


def test_a_model_without_prompts_is_refused_in_one_line():
    mixture = GaussianMixture([[-1.0, 0.0], [1.0, 0.0]], stds=[0.5, 0.5])
    with pytest.raises(ConfigError, match="takes no text prompts") as error:
        Components.over_prompts(mixture, PROMPTS)
    assert "encode_prompts" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("kind", ["stand-in", "tiny-pipeline"])
def test_and_over_two_text_models_each_with_its_own_prompt(kind, tiny_folders):
    model_a, model_b = _text_model(kind, tiny_folders, "a"), _text_model(kind, tiny_folders, "b")
    conds = [{"encoder_hidden_states": model_a.encode_prompts(["a cat"])},
             {"encoder_hidden_states": model_b.encode_prompts(["a dog"])}]
    result, rows = _run([model_a, model_b], Components.over_models([model_a, model_b], conds))
    assert result.x.shape == (N, *model_a.data_shape) and torch.isfinite(result.log_q).all()
    assert rows == [N] * (2 * STEPS) and result.model_calls == 2 * STEPS    # one call per model per step
    torch.testing.assert_close(result.log_q[:, 0], result.log_q[:, 1], rtol=1e-4, atol=1e-3)   # as above


def test_two_pipelines_take_prompt_strings_as_conditions(tiny_folders):
    model_a, model_b = _text_model("tiny-pipeline", tiny_folders, "a"), _text_model("tiny-pipeline", tiny_folders, "b")
    embeddings = [{"encoder_hidden_states": model_a.encode_prompts(["a cat"])},
                  {"encoder_hidden_states": model_b.encode_prompts(["a dog"])}]
    embedded = Components.over_models([model_a, model_b], embeddings)
    by_string = Components.over_models([model_a, model_b], [{"prompt": "a cat"}, {"prompt": "a dog"}])
    expected, _ = _run([model_a, model_b], embedded)
    result, _ = _run([model_a, model_b], by_string)
    torch.testing.assert_close(result.x, expected.x, rtol=0, atol=1e-6)   # the same embeddings, however passed


@pytest.mark.parametrize("sde", [True, False], ids=["sde", "ode"])
def test_and_over_two_pixel_diffusers_pipelines(tiny_folders, sde):
    models = [difflab.load(tiny_folders["pixel_a"]), difflab.load(tiny_folders["pixel_b"])]
    sigmas = get_sigmas("karras", STEPS + 1, max(m.sigma_min for m in models), 10.0)
    x = seeded_noise(range(N), tuple(models[0].data_shape), float(sigmas[0]))
    with torch.no_grad():
        result = superdiff(Components.over_models(models), x, sigmas, mode="and", sde=sde,
                           generator=PerSampleGenerator(range(N)))
    assert result.x.shape == (N, 3, 8, 8) and torch.isfinite(result.x).all()
    torch.testing.assert_close(result.log_q[:, 0], result.log_q[:, 1], rtol=1e-4, atol=1e-3)   # as above
