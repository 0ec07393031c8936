"""Loading models from disk: difflab folders and local diffusers folders, never unpickling."""
from __future__ import annotations

import json

import pytest
import torch

import difflab
from difflab.core.errors import ModelFormatError
from difflab.core.wrappers import EDMDenoiser
from difflab.nets import MLP, UNet

diffusers = pytest.importorskip("diffusers")


def tiny_unet2d(sample_size: int = 8):
    return diffusers.UNet2DModel(sample_size=sample_size, in_channels=1, out_channels=1,
                                 block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))


@pytest.fixture
def diffusers_folder(tmp_path):
    def make(prediction_type: str = "epsilon", layout: str = "pipeline"):
        torch.manual_seed(0)
        unet = tiny_unet2d()
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
        root = tmp_path / f"{prediction_type}-{layout}"
        unet_dir = root / "unet" if layout == "pipeline" else root
        unet.save_pretrained(unet_dir, safe_serialization=True)
        scheduler.save_pretrained(root / "scheduler" if layout == "pipeline" else root)
        return root, unet.eval(), scheduler
    return make


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("layout", ["pipeline", "unet_folder"])
def test_diffusers_unet_loads_as_the_sigma_space_denoiser(diffusers_folder, prediction_type, layout):
    root, unet, scheduler = diffusers_folder(prediction_type, layout)
    denoiser = difflab.load(root)
    a_bar = scheduler.alphas_cumprod.double()
    t = 400                                                     # an exact table entry: no interpolation
    sigma = float(((1 - a_bar[t]) / a_bar[t]).sqrt())
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * (1 + sigma)
    with torch.no_grad():
        d = denoiser(x.float(), torch.full((3,), sigma)).double()
        x_vp = (x * a_bar[t].sqrt()).float()                   # x_t = sqrt(ᾱ)·x0 + sqrt(1−ᾱ)·ε = sqrt(ᾱ)·x_σ
        out = unet(x_vp, torch.full((3,), float(t))).sample.double()
    if prediction_type == "epsilon":                            # DDPM eq. (15): x0 = (x_t − sqrt(1−ᾱ)ε)/sqrt(ᾱ)
        x0 = (x_vp.double() - (1 - a_bar[t]).sqrt() * out) / a_bar[t].sqrt()
    else:                                                       # Salimans & Ho: x0 = sqrt(ᾱ)x_t − sqrt(1−ᾱ)v
        x0 = a_bar[t].sqrt() * x_vp.double() - (1 - a_bar[t]).sqrt() * out
    assert torch.allclose(d, x0, atol=1e-4, rtol=1e-4)         # float32 network, float64 reference
    assert denoiser.data_shape == (1, 8, 8)
    assert denoiser.last_feature is not None and denoiser.last_feature.shape[0] == 3


@pytest.mark.reliability("configs")
def test_diffusers_folder_with_only_pickled_weights_is_refused(diffusers_folder):
    root, _, _ = diffusers_folder("epsilon", "pipeline")
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelFormatError, match="safetensors"):
        difflab.load(root)


@pytest.mark.reliability("configs")
def test_diffusers_folder_without_scheduler_is_refused(diffusers_folder):
    root, _, _ = diffusers_folder("epsilon", "unet_folder")
    (root / "scheduler_config.json").unlink()
    with pytest.raises(ModelFormatError, match="scheduler"):
        difflab.load(root)


@pytest.mark.parametrize("damage", ["truncated weights", "unet config not JSON", "scheduler config not JSON"])
@pytest.mark.reliability("configs")
def test_a_broken_diffusers_folder_is_a_one_line_model_format_error(diffusers_folder, damage):
    root, _, _ = diffusers_folder("epsilon", "pipeline")
    if damage == "truncated weights":
        weights = root / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        folder = root / ("unet" if damage.startswith("unet") else "scheduler")
        next(folder.glob("*config.json")).write_text("{not json")
    with pytest.raises(ModelFormatError) as err:
        difflab.load(root)
    assert "\n" not in str(err.value)


@pytest.mark.reliability("configs")
def test_a_flow_matching_scheduler_is_read_as_flow_not_as_ddpm(diffusers_folder):
    root, _, _ = diffusers_folder("epsilon", "pipeline")
    (root / "scheduler").rename(root / "ddpm")
    diffusers.FlowMatchEulerDiscreteScheduler().save_pretrained(root / "scheduler")
    assert isinstance(difflab.load(root), difflab.FlowDenoiser)   # tests/interop/test_loader.py checks its sampling


@pytest.mark.parametrize("net", [MLP(dim=2, hidden=16, depth=1, zero_init_output=False),
                                 UNet(base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
                                      attn_resolutions=[], groups=4, num_classes=3, zero_init_output=False)])
def test_edm_denoiser_round_trips_through_disk(tmp_path, net):
    shape = (2,) if isinstance(net, MLP) else (1, 8, 8)
    denoiser = EDMDenoiser(net, sigma_data=0.7, data_shape=shape, meta={"dataset": "test"})
    denoiser.save(tmp_path / "m")
    loaded = difflab.load(tmp_path / "m")
    x, sigma = torch.randn(4, *shape), torch.tensor([0.1, 1.0, 5.0, 50.0])
    cond = {} if isinstance(net, MLP) else {"class_labels": torch.tensor([0, 1, 2, -1])}
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, **cond), denoiser(x, sigma, **cond))
    assert loaded.data_shape == shape and loaded.meta["dataset"] == "test" and loaded.sigma_data == 0.7


@pytest.mark.reliability("configs")
def test_config_naming_a_class_outside_the_allow_list_is_refused(tmp_path):
    denoiser = EDMDenoiser(MLP(dim=2, hidden=8, depth=1), data_shape=(2,))
    denoiser.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["network"]["class"] = "os.system"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="not allowed"):
        difflab.load(tmp_path / "m")


@pytest.mark.reliability("configs")
def test_config_whose_shapes_do_not_match_the_weights_is_refused(tmp_path):
    EDMDenoiser(MLP(dim=2, hidden=8, depth=1), data_shape=(2,)).save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["network"]["args"]["hidden"] = 16
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="do not match"):
        difflab.load(tmp_path / "m")


@pytest.mark.parametrize("hidden, message", [(60_000, "do not match its config.json"), (10**6, "exceed")])
@pytest.mark.reliability("configs")
def test_a_config_asking_for_a_huge_network_is_refused_before_allocating(tmp_path, hidden, message):
    """hidden = 60,000 in a depth-2 MLP is 3.6·10^9 weights (14 GB): the shapes are checked on the meta
    device against the weights file, so the refusal is a ModelFormatError, not an allocation; a size
    beyond any network difflab builds (10^6) is refused before even that."""
    EDMDenoiser(MLP(dim=2, hidden=16, depth=2), data_shape=(2,)).save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["network"]["args"]["hidden"] = hidden
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=message):
        difflab.load(tmp_path / "m")


@pytest.mark.parametrize("field, value", [("data_shape", [2, -1]), ("data_shape", "2"), ("sigma_data", 0),
                                          ("sigma_data", "half"), ("sigma_max", None)])
@pytest.mark.reliability("configs")
def test_bad_scalar_fields_in_a_config_are_one_line_errors(tmp_path, field, value):
    EDMDenoiser(MLP(dim=2, hidden=16, depth=2), data_shape=(2,)).save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config[field] = value
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=field) as err:
        difflab.load(tmp_path / "m")
    assert "\n" not in str(err.value)
