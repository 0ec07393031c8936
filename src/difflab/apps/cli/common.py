"""What every `difflab` command shares: the device choice, output checks, limits, the one-line failure.

Sub-apps (cli_compose, cli_condition, cli_distill) import from here, not from `difflab.apps.cli.app`, which
mounts them: no import cycle whichever module is imported first.
"""
from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer

from difflab.core.errors import ConfigError

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


def expand_greedy(args: list[str], greedy: tuple[str, ...]) -> list[str]:
    """Repeat a greedy flag before each of the values that follow it, up to the next option:
    ["--models", "a", "b"] -> ["--models", "a", "--models", "b"] (click options take one value each)."""
    out, current = [], None
    for token in args:
        if token.startswith("-") and not _is_number(token):
            current = token if token in greedy else None
            out.append(token)
        elif current is not None and out and out[-1] != current:
            out.extend([current, token])
        else:
            out.append(token)
    return out


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def greedy_options(base: type, flags: tuple[str, ...]) -> type:
    """A subclass of the click command / group class `base` whose options `flags` take several values
    after one flag (`--models a b c`), as well as the flag repeated."""

    class Greedy(base):
        def parse_args(self, ctx, args: list[str]) -> list[str]:
            return super().parse_args(ctx, expand_greedy(list(args), flags))

    Greedy.__name__ = Greedy.__qualname__ = f"Greedy{base.__name__}"
    return Greedy
