"""`load(path)`: any model folder -> its object, dispatched through a registry. Never unpickles.

difflab folders (config.json + model.safetensors) dispatch on the config's "class"; a class no
package registered is refused. Folders in a foreign layout (diffusers) are recognised by the
detectors that `register_format` added, tried before the difflab layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from difflab.core.errors import ModelFormatError
from difflab.core.fingerprint import PINNED, fingerprint
from difflab.core.serialization import CONFIG_NAME, WEIGHTS_NAME, read_config, read_model_folder

KindLoader = Callable[[dict, dict, Path], Any]            # (config, tensors, folder) -> model
_KINDS: dict[str, KindLoader] = {}
_FORMATS: list[tuple[str, Callable[[Path], bool], Callable[..., Any]]] = []


def register_kind(name: str, loader: KindLoader) -> None:
    """Let `load` rebuild folders whose config.json says {"class": name}. Registering twice replaces."""
    _KINDS[name] = loader


def register_format(name: str, detect: Callable[[Path], bool], loader: Callable[..., Any]) -> None:
    """Let `load` read a foreign folder layout: `detect(path)` says whether it is one,
    `loader(path, device=, torch_dtype=, variant=)` reads it."""
    global _FORMATS
    _FORMATS = [entry for entry in _FORMATS if entry[0] != name] + [(name, detect, loader)]


def registered_kinds() -> list[str]:
    return sorted(_KINDS)


def kind_loader(name: str) -> KindLoader:
    """The loader registered for a config's "class" (for add-ons that hold another model's config)."""
    if name not in _KINDS:
        raise ModelFormatError(f"no loader for class {name!r}; known classes: {registered_kinds()}")
    return _KINDS[name]


def load(path: str | Path, device: str | torch.device | None = None, torch_dtype: torch.dtype | None = None,
         variant: str | None = None) -> Any:
    """Load a model folder as a denoiser or add-on (eval mode, frozen) on `device` (default: the CPU).

    torch_dtype: cast the floating weights (e.g. torch.float16 for a large model on a GPU); the
    fingerprint stays that of the weights as stored. variant: a diffusers weights variant
    (`diffusion_pytorch_model.<variant>.safetensors`); difflab folders have none. Foreign formats
    are read by their registered loader, `loader(path, device=, torch_dtype=, variant=)`.
    """
    path = Path(path)
    for _, detect, loader in _FORMATS:
        if detect(path):
            return loader(path, device=device, torch_dtype=torch_dtype, variant=variant)
    if variant is not None:
        raise ModelFormatError(f"variant={variant!r} names a diffusers weights file; {path} is a difflab folder "
                               f"with one {WEIGHTS_NAME}: load it without a variant")
    config, tensors = read_model_folder(path)
    cls = config.get("class")
    if not isinstance(cls, str) or cls not in _KINDS:
        raise ModelFormatError(f"{path / CONFIG_NAME} names class {cls!r}, which difflab does not load; "
                               f"known classes: {registered_kinds()}")
    model = _KINDS[cls](config, tensors, path)
    if torch_dtype is not None:
        identity = fingerprint(model)       # of the weights as stored, before rounding them
        model = model.to(torch_dtype)
        setattr(model, PINNED, identity)
    return model.to(device)


def info(path: str | Path) -> dict:
    """The config of a model folder plus its parameter count."""
    model = load(path)
    n_params = sum(t.numel() for t in model.state_dict().values())
    config = read_config(Path(path) / "unet") if (Path(path) / "unet").is_dir() else read_config(Path(path))
    return {**config, "parameters": n_params}
