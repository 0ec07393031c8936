"""Models on disk: a folder with `config.json` and `model.safetensors`. Never unpickles.

Writes are atomic: the folder is assembled under a temporary name beside the target and renamed
into place, so a crash leaves either the old model or the new one, never half of one.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from difflab.core.errors import ModelFormatError
from difflab.core.io import atomic_folder, write_json

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


def difflab_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("difflab")
    except PackageNotFoundError:   # run from a source tree that was never installed
        return "unknown"


class SavedModel:
    """Mixin for everything difflab writes as a model folder: networks, mixtures and add-ons.

    A subclass defines `config() -> dict` (JSON-serialisable, with the "class" that `difflab.load`
    dispatches on) and a classmethod `from_folder(config, tensors, path)` that rebuilds it; its
    package registers that with `difflab.models.register_kind`. The weights are `tensors()`: the
    state_dict unless the class defines its own (the mixture saves its defining parameters).
    """

    def config(self) -> dict:
        raise NotImplementedError

    def tensors(self) -> dict[str, Tensor]:
        return self.state_dict()

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write config.json + model.safetensors to the folder `path`, atomically. Returns the path."""
        return write_model_folder(path, self.config(), self.tensors(), overwrite=overwrite)


def write_model_folder(path: str | Path, config: dict, tensors: dict[str, Tensor], overwrite: bool = False) -> Path:
    """Write config.json + model.safetensors to `path` atomically. Returns the path."""
    path = Path(path)
    config = {**config, "difflab_version": difflab_version()}
    with atomic_folder(path, overwrite=overwrite) as tmp:
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(contiguous, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        write_json(tmp / CONFIG_NAME, config, sort_keys=True)
    return path


def read_model_folder(path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(config, tensors) of a difflab model folder, with a specific error for each way it can be wrong."""
    path = Path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise ModelFormatError(_pickle_message(path))
    if not path.is_dir():
        raise ModelFormatError(f"no model folder at {path} (expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    weights = path / WEIGHTS_NAME
    # a pickled checkpoint (with or without a config.json) gets the pickle message, not "config missing"
    pickles = [] if weights.is_file() else sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelFormatError(_pickle_message(path / pickles[0]))
    config = read_config(path)
    if not weights.is_file():
        raise ModelFormatError(f"{weights} is missing")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFormatError(f"{weights} is not a readable safetensors file ({err}); it may be truncated") from err
    return config, tensors


def read_config(path: Path) -> dict:
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise ModelFormatError(f"{config_file} is missing: {path} is not a difflab model folder")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFormatError(f"{config_file} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ModelFormatError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
    return config


def _pickle_message(file: Path) -> str:
    return (f"{file} is a pickle-based checkpoint; difflab never unpickles files (they can run code). "
            "If you trust it, convert it once: `state = torch.load(f, weights_only=True)` then "
            "`safetensors.torch.save_file(state, 'model.safetensors')` with a config.json beside it")
