"""Local diffusers folders as σ-space denoisers: a `UNet2DModel` / `UNet2DConditionModel` with its
scheduler config, wrapped in `VPDenoiser`. Registered with `difflab.load` as the "diffusers" format.
Only safetensors weights are read; diffusers itself is imported on first use.
"""
from __future__ import annotations

import json
from pathlib import Path

from difflab.core.errors import ModelFormatError
from difflab.core.serialization import CONFIG_NAME, read_config
from difflab.core.wrappers import VPDenoiser
from difflab.models import register_format
from difflab.nets.diffusers_unet import DiffusersUNet


def is_diffusers_folder(path: Path) -> bool:
    if (path / "unet").is_dir() and (path / "scheduler").is_dir():
        return True
    if (path / CONFIG_NAME).is_file():
        try:
            return "_class_name" in json.loads((path / CONFIG_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
    return False


def read_config_file(file: Path) -> dict:
    """A diffusers JSON config as a dict, with a one-line error when it is not one."""
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFormatError(f"{file} is not a readable JSON config ({err})") from err
    if not isinstance(config, dict):
        raise ModelFormatError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


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
    scheduler_class = read_config_file(scheduler_dir / "scheduler_config.json").get("_class_name", "")
    if "FlowMatch" in str(scheduler_class):
        raise ModelFormatError(f"{scheduler_dir} holds a {scheduler_class} (a flow-matching, velocity model); "
                               "difflab's diffusers loader reads DDPM-table (ε / v / x0) models only: wrap the "
                               "network yourself with difflab.FlowDenoiser")
    try:
        unet = classes[class_name].from_pretrained(unet_dir, use_safetensors=True)
        scheduler = DDPMScheduler.from_pretrained(scheduler_dir)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:   # diffusers' ways to say "broken"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFormatError(f"{path} is not a loadable diffusers folder: {first_line}") from err
    denoiser = VPDenoiser(DiffusersUNet(unet), scheduler.alphas_cumprod, scheduler.config.prediction_type)
    sample_size = unet.config.sample_size
    size = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    denoiser.data_shape = (unet.config.in_channels, *size)
    return denoiser.eval().requires_grad_(False)


register_format("diffusers", is_diffusers_folder, load_diffusers)
