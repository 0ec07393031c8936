"""Local diffusers folders as σ-space denoisers, registered with `difflab.load` as the "diffusers" format.

- a UNet (`UNet2DModel` / `UNet2DConditionModel`) with a DDPM-table scheduler config: `VPDenoiser` (ε / v /
  sample prediction); with a `FlowMatchEulerDiscreteScheduler`: `FlowDenoiser` (velocity, conventions.md (11));
- a latent text-to-image pipeline (`unet/ vae/ text_encoder/ tokenizer/ scheduler/`, Stable Diffusion 1.x / 2.x):
  `TextToImageDenoiser` around that denoiser (prompts as conditions, `decode` to images).

Layouts: a pipeline folder with `unet/` and `scheduler/`, or a UNet folder whose `scheduler_config.json` sits
beside it (or in a `scheduler/` sub-folder). Only safetensors are read (`variant` picks
`diffusion_pytorch_model.<variant>.safetensors`); diffusers itself is imported on first use.

A folder that difflab wrote as a guided-distillation student (`difflab_student.json` beside `unet/`) is that
student: `load_diffusers` hands it to `student.load_diffusers_student` (registered by student.py on import, which
the package's __init__ does), whatever the formats' registration order.

Identity: the loaded model's fingerprint is pinned at load time to a hash of the stored weights files' bytes,
the components' configs (without paths and versions) and the σ-space definition (ᾱ table and prediction
type, or the flow's time scale): equal for copies of the folder and for every `torch_dtype` it is loaded in.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from difflab.core.errors import ModelFormatError
from difflab.core.fingerprint import PINNED, stored_fingerprint
from difflab.core.serialization import CONFIG_NAME
from difflab.core.wrappers import FlowDenoiser, VPDenoiser
from difflab.models import register_format
from difflab.nets.diffusers_unet import DiffusersUNet

UNETS = ("UNet2DModel", "UNet2DConditionModel")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
PREDICTIONS = ("epsilon", "v_prediction", "sample")
TEXT_PARTS = ("vae", "text_encoder", "tokenizer")
STUDENT_FILE = "difflab_student.json"   # what marks a guided-distillation student that difflab wrote
LIBRARY_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError)
# config keys that name where or by what a folder was written, not what it holds
NOT_IDENTITY = ("_name_or_path", "_diffusers_version", "_use_default_values", "transformers_version", "dtype",
                "torch_dtype", "architectures")


def is_diffusers_folder(path: Path) -> bool:
    if ((path / "unet").is_dir() or (path / "transformer").is_dir()) and (path / "scheduler").is_dir():
        return True
    if (path / CONFIG_NAME).is_file():
        try:
            return "_class_name" in json.loads((path / CONFIG_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
    return False


_student_loader = None   # student.py's load_diffusers_student, set by `register_student_loader` (no import cycle)


def register_student_loader(loader) -> None:
    """Let `load_diffusers` hand a difflab-written student folder (`STUDENT_FILE`) to `loader`."""
    global _student_loader
    _student_loader = loader


def is_student_folder(path: Path) -> bool:
    """Whether `path` is a diffusers student folder that difflab wrote (`save_diffusers_student`)."""
    return (path / STUDENT_FILE).is_file() and (path / "unet").is_dir()


def read_config_file(file: Path) -> dict:
    """A diffusers JSON config as a dict, with a one-line error when it is not one."""
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFormatError(f"{file} is not a readable JSON config ({err})") from err
    if not isinstance(config, dict):
        raise ModelFormatError(f"{file} must hold a JSON object, got {type(config).__name__}")
    return config


def load_diffusers(path: str | Path, device: str | torch.device | None = None, torch_dtype: torch.dtype | None = None,
                   variant: str | None = None):
    """A local diffusers folder as a σ-space denoiser (see the module docstring), eval mode and frozen.

    torch_dtype: the weights' dtype (default float32; a real Stable Diffusion wants torch.float16 on a GPU);
    the solver state may stay float32 (`difflab.sample` converts at the network's boundary).
    variant: read `diffusion_pytorch_model.<variant>.safetensors` (and `model.<variant>.safetensors`).
    """
    path = Path(path)
    if is_student_folder(path):
        if _student_loader is None:
            raise ModelFormatError(f"{path} is a difflab student folder; import difflab.interop.diffusers to load it")
        return _student_loader(path, device=device, torch_dtype=torch_dtype, variant=variant)
    torch_dtype = torch_dtype or torch.float32
    _refuse_unknown_layouts(path)
    unet_dir = _unet_dir(path)
    text_to_image = _is_text_to_image(path, _unet_class(unet_dir))
    weights = [weights_file(unet_dir, "diffusion_pytorch_model", variant)]
    if text_to_image:
        weights += [weights_file(path / "vae", "diffusion_pytorch_model", variant),
                    weights_file(path / "text_encoder", "model", variant)]
    model = load_unet_denoiser(path, torch_dtype, variant)
    if text_to_image:
        with _one_line_errors(path):
            model = _with_text_components(path, model, torch_dtype, variant)
    setattr(model, PINNED, _identity(path, unet_dir, weights, model))
    return model.to(device).eval().requires_grad_(False)


def load_unet_denoiser(path: str | Path, torch_dtype: torch.dtype | None = None, variant: str | None = None):
    """The UNet of a diffusers folder (`unet/` of a pipeline, or a UNet folder) alone as its σ-space denoiser,
    VPDenoiser or FlowDenoiser with `data_shape` (C, H, W), weights in `torch_dtype` (default float32), on the
    CPU, without the VAE and text encoder and with no pinned fingerprint. Its diffusers UNet: `.model.unet`."""
    path = Path(path)
    unet_dir = _unet_dir(path)
    _unet_class(unet_dir)
    weights_file(unet_dir, "diffusion_pytorch_model", variant)    # safetensors only, said in one line
    scheduler = read_config_file(_scheduler_dir(path, unet_dir) / "scheduler_config.json")
    with _one_line_errors(path):
        return _load_denoiser(unet_dir, scheduler, torch_dtype or torch.float32, variant)


def weights_file(folder: Path, stem: str, variant: str | None) -> Path:
    """`<stem>[.<variant>].safetensors` in `folder`, or a one-line ModelFormatError naming what is there."""
    name = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    if (folder / name).is_file():
        return folder / name
    found = sorted(p.name for p in folder.iterdir() if "safetensors" in p.name or p.suffix == ".bin") \
        if folder.is_dir() else []
    if variant is None and found and all(p.endswith(".bin") for p in found):
        raise ModelFormatError(f"{folder} has no {name}, only {found}; difflab does not read pickled .bin weights "
                               "(re-save with `save_pretrained(..., safe_serialization=True)`)")
    hint = "" if variant is None else f" (variant {variant!r}; pass the variant these files name, or none)"
    raise ModelFormatError(f"{folder} has no {name}{hint}; weights files found: {found or 'none'}")


def _refuse_unknown_layouts(path: Path) -> None:
    if (path / "transformer").is_dir():
        raise ModelFormatError(f"{path} holds a diffusers transformer (SD3 / Flux style); difflab loads UNet "
                               "pipelines only (unet/ + scheduler/, optionally vae/ text_encoder/ tokenizer/)")
    extra = sorted(p.name for p in path.glob("text_encoder_*")) + sorted(p.name for p in path.glob("tokenizer_*"))
    if extra:
        raise ModelFormatError(f"{path} has more than one text encoder ({extra}: SDXL style); difflab loads "
                               "single-CLIP pipelines (Stable Diffusion 1.x / 2.x)")


def _unet_dir(path: Path) -> Path:
    return path / "unet" if (path / "unet").is_dir() else path


def _unet_class(unet_dir: Path) -> str:
    unet_class = read_config_file(unet_dir / CONFIG_NAME).get("_class_name")
    if unet_class not in UNETS:
        raise ModelFormatError(f"{unet_dir} holds a diffusers {unet_class!r}; supported: {list(UNETS)}")
    return unet_class


@contextmanager
def _one_line_errors(path: Path) -> Iterator[None]:
    """diffusers' and transformers' ways to say "broken", as one ModelFormatError line; their loading
    progress bars silenced meanwhile (a local load takes a second, and the CLI's stderr is its error line)."""
    with _progress_bars_off():
        try:
            yield
        except LIBRARY_ERRORS as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelFormatError(f"{path} is not a loadable diffusers folder: {first_line}") from err


@contextmanager
def _progress_bars_off() -> Iterator[None]:
    from diffusers.utils import logging as diffusers_logging
    try:   # transformers is needed for text encoders only (the `diffusers` extra)
        from transformers.utils import logging as transformers_logging
    except ImportError:
        transformers_logging = None
    libraries = [lib for lib in (diffusers_logging, transformers_logging) if lib and lib.is_progress_bar_enabled()]
    for lib in libraries:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib in libraries:
            lib.enable_progress_bar()


def _scheduler_dir(path: Path, unet_dir: Path) -> Path:
    for folder in (path / "scheduler", path, unet_dir / "scheduler"):
        if (folder / "scheduler_config.json").is_file():
            return folder
    raise ModelFormatError(f"{path} has a diffusers UNet but no scheduler_config.json (looked in {path} and "
                           f"{path / 'scheduler'}); save the scheduler with `scheduler.save_pretrained`")


def _is_text_to_image(path: Path, unet_class: str) -> bool:
    """A pipeline folder with a text UNet or any text part is a text-to-image pipeline: all parts must be there."""
    present = [part for part in TEXT_PARTS if (path / part).is_dir()]
    if not present and not (unet_class == "UNet2DConditionModel" and (path / "unet").is_dir()):
        return False
    missing = [part for part in TEXT_PARTS if part not in present]
    if missing or unet_class != "UNet2DConditionModel":
        raise ModelFormatError(f"{path} looks like a text-to-image pipeline but has unet {unet_class!r} and no "
                               f"{missing}; difflab loads Stable Diffusion layouts (UNet2DConditionModel, "
                               f"{', '.join(TEXT_PARTS)}) or a UNet with its scheduler alone")
    return True


def _load_denoiser(unet_dir: Path, scheduler: dict, torch_dtype: torch.dtype, variant: str | None):
    """The UNet in σ-space: FlowDenoiser for a flow-matching scheduler, VPDenoiser for a DDPM table."""
    import diffusers

    unet = getattr(diffusers, read_config_file(unet_dir / CONFIG_NAME)["_class_name"]).from_pretrained(
        unet_dir, use_safetensors=True, variant=variant, torch_dtype=torch_dtype)
    net = DiffusersUNet(unet)
    if scheduler.get("_class_name") in FLOW_SCHEDULERS:
        denoiser = flow_denoiser(net, scheduler, unet_dir)
    else:
        denoiser = vp_denoiser(net, scheduler, unet_dir)
    sample_size = unet.config.sample_size
    denoiser.data_shape = (unet.config.in_channels, *((sample_size,) * 2 if isinstance(sample_size, int)
                                                       else sample_size))
    return denoiser


def vp_denoiser(net: DiffusersUNet, scheduler: dict, where: Path) -> VPDenoiser:
    """ε / v / sample prediction on the scheduler's ᾱ table (any DDPM-table scheduler: DDPM, DDIM, PNDM, Euler...)."""
    from diffusers import DDPMScheduler

    prediction_type = scheduler.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTIONS:
        raise ModelFormatError(f"{where}'s scheduler says prediction_type={prediction_type!r}; difflab reads "
                               f"{list(PREDICTIONS)} on a DDPM table, or a FlowMatchEulerDiscreteScheduler")
    table = {k: v for k, v in scheduler.items() if not k.startswith("_")}
    alphas_cumprod = DDPMScheduler.from_config(table).alphas_cumprod
    return VPDenoiser(net, alphas_cumprod, prediction_type)


def flow_denoiser(net: DiffusersUNet, scheduler: dict, where: Path) -> FlowDenoiser:
    """diffusers' flow matching (FlowMatchEulerDiscreteScheduler): x_t = (1 − t)·x0 + t·ε, the network
    predicts v = ε − x0 at timestep t·num_train_timesteps. The scheduler's `shift` only re-spaces its
    sampling grid (the network is trained on every t), so the denoiser ignores it; the σ range is the
    shifted table's, with t = 1 (σ = ∞) replaced by the table's next entry."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if scheduler.get("invert_sigmas"):
        raise ModelFormatError(f"{where}'s flow scheduler has invert_sigmas=True (Mochi style); not supported")
    table = FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in scheduler.items()
                                                         if not k.startswith("_")}).sigmas.double()
    t_max = float(table[table < 1].max())
    t_min = float(table.min())
    denoiser = FlowDenoiser(net, time_scale=float(scheduler.get("num_train_timesteps", 1000)))
    denoiser.sigma_min, denoiser.sigma_max = t_min / (1 - t_min), t_max / (1 - t_max)   # σ = t/(1 − t)
    return denoiser


def _with_text_components(path: Path, denoiser, torch_dtype: torch.dtype, variant: str | None):
    from difflab.interop.diffusers.text_to_image import (
        TEXT_ENCODERS,
        TOKENIZERS,
        TextToImageDenoiser,
        load_text_components,
    )

    index = read_config_file(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    names = {part: (index.get(part) or [None, None])[1] for part in TEXT_PARTS}
    names = {"vae": names["vae"] or "AutoencoderKL", "text_encoder": names["text_encoder"] or "CLIPTextModel",
             "tokenizer": names["tokenizer"] or "CLIPTokenizer"}
    if names["vae"] != "AutoencoderKL" or names["text_encoder"] not in TEXT_ENCODERS \
            or names["tokenizer"] not in TOKENIZERS:
        raise ModelFormatError(f"{path}/model_index.json names {names}; difflab loads AutoencoderKL, "
                               f"{list(TEXT_ENCODERS)} and {list(TOKENIZERS)}")
    vae, text_encoder, tokenizer = load_text_components(path, torch_dtype, variant, names)
    return TextToImageDenoiser(denoiser, vae, text_encoder, tokenizer)


def _identity(path: Path, unet_dir: Path, weights: list[Path], model) -> str:
    """The pinned fingerprint: weights files' bytes, configs and the σ-space definition (module docstring)."""
    config_files = [unet_dir / CONFIG_NAME] + [path / part / CONFIG_NAME for part in ("vae", "text_encoder")
                                               if (path / part / CONFIG_NAME).is_file()]
    tokenizer_files = [f for name in ("vocab.json", "merges.txt") if (f := path / "tokenizer" / name).is_file()]
    denoiser = getattr(model, "denoiser", model)
    if isinstance(denoiser, VPDenoiser):
        definition = {"vp": denoiser.prediction_type, "log_sigmas": denoiser.log_sigmas.float().tolist()}
    else:
        definition = {"flow": denoiser.time_scale}
    configs = [{k: v for k, v in read_config_file(f).items() if k not in NOT_IDENTITY} for f in config_files]
    definition |= {"class": type(model).__name__, "configs": configs}
    return stored_fingerprint(weights + tokenizer_files, definition)


register_format("diffusers", is_diffusers_folder, load_diffusers)
