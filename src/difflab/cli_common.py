"""What every `difflab` command shares: the device choice, output checks, limits, the one-line failure.

Sub-apps (cli_compose, cli_condition, cli_distill) import from here, not from `difflab.cli`, which
mounts them: no import cycle whichever module is imported first.
"""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer

from .errors import ConfigError

MAX_SEED = 2**62          # seeds (plus per-sample offsets) must stay inside torch's 64-bit seed
MAX_STEPS = 10**9         # optimiser steps / trajectories: beyond any run, refuses typos like 10**30
MAX_BATCH = 2**20


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def fail(message: str) -> None:
    """One line on stderr, exit status 2: how every mistake the user can fix ends."""
    typer.echo(f"error: {message}", err=True)
    sys.exit(2)


def resolve_device(device: Device) -> str:
    import torch

    if device == Device.cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but torch sees no CUDA device; use --device cpu")
    return "cuda" if device == Device.auto and torch.cuda.is_available() else ("cpu" if device == Device.auto else device.value)


def check_output(path: Path, force: bool, suffixes: tuple[str, ...] | None = None) -> None:
    """Validate an output path before any work: suffix, and no silent overwrite."""
    if suffixes and path.suffix not in suffixes:
        raise ConfigError(f"--out {path} must end in one of {', '.join(suffixes)}")
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists; pass --force to overwrite it")
