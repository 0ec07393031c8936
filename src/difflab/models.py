"""`difflab.load`: any model folder on disk -> a ready denoiser (or add-on). Never unpickles.

difflab folders (config.json + model.safetensors) are dispatched on the config's "class" through
an allow-list; a local diffusers folder (a `UNet2DModel` / `UNet2DConditionModel` with its
scheduler config) loads through the VP wrapper.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .core.mixture import GaussianMixture
from .core.serialization import CONFIG_NAME, read_config, read_model_folder
from .core.wrappers import EDMDenoiser, VPDenoiser
from .errors import ModelFormatError


def _build_network(spec: Any) -> nn.Module:
    from .nets import NETWORKS  # the allow-list of network classes
    if not isinstance(spec, dict) or spec.get("class") not in NETWORKS:
        name = spec.get("class") if isinstance(spec, dict) else spec
        raise ModelFormatError(f"network class {name!r} is not allowed; known networks: {sorted(NETWORKS)}")
    try:
        return NETWORKS[spec["class"]](**spec.get("args", {}))
    except (TypeError, ValueError) as err:
        raise ModelFormatError(f"cannot build {spec['class']} from the config's arguments: {err}") from err


def _load_state(module: nn.Module, tensors: dict[str, Tensor], path: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label}: {keys[:3]}{' …' if len(keys) > 3 else ''}" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if keys)
        raise ModelFormatError(f"the weights in {path} do not match its config.json ({detail})")
    module.load_state_dict(tensors)


def _load_edm(config: dict, tensors: dict[str, Tensor], path: Path) -> EDMDenoiser:
    known = {"class", "kind", "convention", "network", "sigma_data", "sigma_min", "sigma_max", "data_shape",
             "difflab_version"}
    denoiser = EDMDenoiser(_build_network(config.get("network")), sigma_data=config.get("sigma_data", 0.5),
                           sigma_min=config.get("sigma_min", 0.002), sigma_max=config.get("sigma_max", 80.0),
                           data_shape=config.get("data_shape"),
                           meta={k: v for k, v in config.items() if k not in known})
    _load_state(denoiser, tensors, path)
    return denoiser.eval().requires_grad_(False)


def _load_mixture(config: dict, tensors: dict[str, Tensor], path: Path) -> GaussianMixture:
    try:
        return GaussianMixture.from_tensors(tensors, config)
    except (KeyError, ValueError) as err:
        raise ModelFormatError(f"{path} is not a valid GaussianMixture ({err})") from err


def _load_amed_predictor(config: dict, tensors: dict[str, Tensor], path: Path):
    from .sampling.amed import AMEDPredictor  # lazy: sampling.amed reads model folders through this module
    return AMEDPredictor.from_folder(config, tensors, path)


def _load_guided_student(config: dict, tensors: dict[str, Tensor], path: Path):
    from .distill.student import GuidedStudent  # lazy: distill/ reads model folders through this module
    return GuidedStudent.from_folder(config, tensors, path)


def _load_deft_hnet(config: dict, tensors: dict[str, Tensor], path: Path):
    from .condition.deft import HNetwork  # lazy: condition/ reads model folders through this module
    return HNetwork.from_folder(config, tensors, path)


LOADERS: dict[str, Callable[[dict, dict, Path], Any]] = {
    "DEFTHNetwork": _load_deft_hnet,
    "EDMDenoiser": _load_edm,
    "GaussianMixture": _load_mixture,
    "AMEDPredictor": _load_amed_predictor,
    "GuidedStudent": _load_guided_student,
}


def load(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """Load a model folder as a denoiser (eval mode, frozen) on `device`.

    difflab folders dispatch on config.json's "class" (allow-listed); diffusers folders (a
    `_class_name` in config.json, or `unet/` + `scheduler/` sub-folders) load through `VPDenoiser`.
    """
    path = Path(path)
    if _is_diffusers_folder(path):
        return load_diffusers(path).to(device)
    config, tensors = read_model_folder(path)
    cls = config.get("class")
    if cls not in LOADERS:
        raise ModelFormatError(f"{path / CONFIG_NAME} names class {cls!r}, which difflab does not load; "
                               f"known classes: {sorted(LOADERS)}")
    return LOADERS[cls](config, tensors, path).to(device)


def info(path: str | Path) -> dict:
    """The config of a model folder plus its parameter count, without building the model twice."""
    model = load(path)
    n_params = sum(t.numel() for t in model.state_dict().values())
    config = read_config(Path(path) / "unet") if (Path(path) / "unet").is_dir() else read_config(Path(path))
    return {**config, "parameters": n_params}


# ----- diffusers interop ------------------------------------------------------------------------
def _is_diffusers_folder(path: Path) -> bool:
    if (path / "unet").is_dir() and (path / "scheduler").is_dir():
        return True
    if (path / CONFIG_NAME).is_file():
        try:
            return "_class_name" in json.loads((path / CONFIG_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
    return False


class DiffusersUNet(nn.Module):
    """A diffusers UNet as `model(x_vp, t, class_labels=None, encoder_hidden_states=None, ...)`.

    Exposes the mid block's output of the last call as `bottleneck` (AMED reads it).
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet, self.bottleneck = unet, None
        if getattr(unet, "mid_block", None) is not None:
            unet.mid_block.register_forward_hook(self._keep_bottleneck)

    def _keep_bottleneck(self, module, args, output) -> None:
        self.bottleneck = output[0] if isinstance(output, tuple) else output

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        if "class_labels" in cond and cond["class_labels"] is None:
            cond.pop("class_labels")
        return self.unet(x, t, **cond, return_dict=False)[0]


def load_diffusers(path: str | Path) -> VPDenoiser:
    """A local diffusers UNet2DModel / UNet2DConditionModel + scheduler config as a σ-space denoiser.

    Layouts: a pipeline folder with `unet/` and `scheduler/`, or a UNet folder whose
    `scheduler_config.json` sits beside (or in a `scheduler/` sub-folder). Only safetensors weights
    are read. The scheduler's betas give ᾱ; its prediction_type picks ε / v / x0.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

    path = Path(path)
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    scheduler_dir = next((d for d in (path / "scheduler", path, unet_dir / "scheduler")
                          if (d / "scheduler_config.json").is_file()), None)
    if scheduler_dir is None:
        raise ModelFormatError(f"{path} has a diffusers UNet but no scheduler_config.json (looked in {path} "
                               f"and {path / 'scheduler'}); save the scheduler with `scheduler.save_pretrained`")
    class_name = read_config(unet_dir).get("_class_name")
    classes = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
    if class_name not in classes:
        raise ModelFormatError(f"{unet_dir} holds a diffusers {class_name!r}; supported: {sorted(classes)}")
    if not (unet_dir / "diffusion_pytorch_model.safetensors").is_file():
        raise ModelFormatError(f"{unet_dir} has no diffusion_pytorch_model.safetensors; difflab does not read "
                               "pickled .bin weights (re-save with `save_pretrained(..., safe_serialization=True)`)")
    unet = classes[class_name].from_pretrained(unet_dir, use_safetensors=True)
    scheduler = DDPMScheduler.from_pretrained(scheduler_dir)
    denoiser = VPDenoiser(DiffusersUNet(unet), scheduler.alphas_cumprod, scheduler.config.prediction_type)
    sample_size = unet.config.sample_size
    size = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    denoiser.data_shape = (unet.config.in_channels, *size)
    return denoiser.eval().requires_grad_(False)
