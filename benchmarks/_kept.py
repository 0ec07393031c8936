"""Shared by the benchmarks: results kept on disk between runs, so a long CPU run resumes where it stopped."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file, save_file
from torch import Tensor

from difflab.core.io import atomic_path


def settings_key(settings: dict, length: int = 16) -> str:
    """A short hex digest of `settings` (JSON, keys sorted): a file name that changes with any setting."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:length]


def kept_tensors(path: Path, make: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """The tensors in `path` (safetensors) if it exists; else `make()`'s, written there atomically (whole or
    absent, never a pickle) and returned."""
    if path.is_file():
        return load_file(str(path))
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in make().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return tensors
