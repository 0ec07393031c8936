"""`fingerprint(model)`: the content hash that names a model, whatever folder it came from.

Add-ons (an AMED predictor, a DEFT h-network, a distilled student) record their base model's
fingerprint and refuse another base. The hash covers what defines the model and nothing else:
for the model and each sub-module its class name and config (a `config()` method or a `config`
dict, without `difflab_version` and the training recipe `fit`: the same weights trained by
another recipe are the same model) and a guidance weight `w` if it has one, then every tensor's
name, dtype, shape and bytes (float64 rounded to float32, so a reloaded eigendecomposition does
not change it). A model that defines `tensors()` (the exact `GaussianMixture`) is named by those.

A loader may pin a module's identity at load time (the attribute `pinned_fingerprint`, e.g. a hash of
the stored safetensors files' bytes, `stored_fingerprint()` below): then that string stands for the
module and everything inside it, so the same stored weights keep one name whatever `torch_dtype` or
folder they were loaded from (a wrapper around such a module hashes the pinned string in its place).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

NOT_IDENTITY = ("difflab_version", "fit")   # the version that wrote it and the recipe that trained it
PINNED = "pinned_fingerprint"               # the attribute a loader sets to pin a module's identity


def fingerprint(model: Any) -> str | None:
    """sha256 hex digest of `model`'s config and weights; None for a callable with no state (a
    plain function has no identity, so no add-on check can be made against it)."""
    if not isinstance(model, nn.Module):
        return None
    if isinstance(getattr(model, PINNED, None), str):
        return getattr(model, PINNED)
    pinned = {name: getattr(module, PINNED) for name, module in model.named_modules()
              if isinstance(getattr(module, PINNED, None), str)}

    def inside_pinned(name: str) -> bool:
        return any(name.startswith(prefix + ".") for prefix in pinned)

    digest = hashlib.sha256()
    for name, module in model.named_modules():
        if inside_pinned(name):
            continue
        if name in pinned:
            digest.update(json.dumps([name, PINNED, pinned[name]]).encode())
            continue
        config = getattr(module, "config", None)
        config = config() if callable(config) else config
        if isinstance(config, dict):
            config = {k: v for k, v in config.items() if k not in NOT_IDENTITY}
        w = getattr(module, "w", None)
        w = w.tolist() if isinstance(w, Tensor) else w if isinstance(w, (int, float)) else None
        digest.update(json.dumps([name, type(module).__name__, config, w], sort_keys=True, default=str).encode())
    tensors = model.tensors() if callable(getattr(model, "tensors", None)) else model.state_dict()
    for key, tensor in sorted(tensors.items()):
        if inside_pinned(key):
            continue
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.float64:
            tensor = tensor.float()
        tensor = tensor.contiguous().reshape(-1)
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def stored_fingerprint(files: list[Path], definition: Any) -> str:
    """sha256 hex digest of the bytes of `files` (in order, named by their file names: not by the folder
    they sit in) and of `definition` (JSON: the configs and conventions that complete them)."""
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True, default=str).encode())
    for file in files:
        digest.update(Path(file).name.encode())
        with open(file, "rb") as stream:
            while chunk := stream.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
