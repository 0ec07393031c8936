"""What every `difflab` command shares: the device choice, output checks and locks, limits, the one-line failure.

Sub-apps (cli_compose, cli_condition, cli_distill) import from here, not from `difflab.apps.cli.app`, which
mounts them: no import cycle whichever module is imported first.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Callable, Iterator

import typer

from difflab.core.errors import ConfigError

MAX_SEED = 2**62          # seeds (plus per-sample offsets) must stay inside torch's 64-bit seed
MAX_NFE = 10_000          # far beyond any useful budget; refuses typos like 10**9 before building a grid
MAX_STEPS = 10**9         # optimiser steps / trajectories: beyond any run, refuses typos like 10**30
MAX_BATCH = 2**20
SIDE_FILE_ROOM = len("..XXXXXXXX.tmp")   # an output NAME has `.NAME.XXXXXXXX.tmp` and `.NAME.lock` beside it


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def fitting(checkpoint_every: int | None, resume: bool, force: bool) -> tuple[dict, bool | str]:
    """(config overrides, resume mode) of a fitting command: --checkpoint-every when given, and with
    --force a checkpoint of another run in OUT.checkpoints is started afresh instead of refused (a
    checkpoint of this same run is still continued)."""
    from difflab.train.loop import SAME_RUN

    overrides = {} if checkpoint_every is None else {"checkpoint_every": checkpoint_every}
    return overrides, (SAME_RUN if resume and force else resume)


# Options that mean the same in every command that takes them (docs/cli.md), declared once.
DEVICE_OPTION = typer.Option(Device.auto, "--device", help="where to run: auto (CUDA when torch sees it), cpu, cuda")
RESUME_OPTION = typer.Option(True, "--resume/--no-resume",
                             help="continue from the checkpoints in OUT.checkpoints if present")
CHECKPOINT_EVERY_OPTION = typer.Option(None, "--checkpoint-every", min=1, max=MAX_STEPS,
                                       help="optimiser steps between checkpoints in OUT.checkpoints (default: the "
                                            "method's)")


def fail(message: str) -> None:
    """One line on stderr, exit status 2: how every mistake the user can fix ends."""
    typer.echo(f"error: {message}", err=True)
    sys.exit(2)


def resolve_device(device: Device) -> str:
    import torch

    if device == Device.cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but torch sees no CUDA device; use --device cpu")
    if device == Device.auto:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.value


def check_output(path: Path, force: bool, suffixes: tuple[str, ...] | None = None, demo: bool = False) -> None:
    """Validate an output before any work (ConfigError, one line, otherwise).

    `suffixes`: the command writes a file with one of them; None: a model folder; `demo`: the demo's
    folder, which it writes into. Refused: an empty --out, a name too long for the file system, a
    place under a file or where nothing can be created, and an existing output without --force.
    --force replaces only what difflab wrote: a file of the command's suffix, a difflab model folder
    (the demo reuses a demo folder and refuses any other non-empty folder).
    """
    _check_location(path, suffixes)
    _check_existing(path, force, suffixes, demo)


def writes_output(command: Callable) -> Callable:
    """Decorate a command that writes its `out` option: it runs holding the output's lock (`locked_output`)."""

    @functools.wraps(command)
    def locked(*args, **kwargs):
        with locked_output(kwargs["out"]):
            return command(*args, **kwargs)

    return locked


@contextmanager
def locked_output(path: Path) -> Iterator[None]:
    """Hold the lock file `.NAME.lock` beside `path` while the block runs, then remove it: a second
    difflab command writing the same output fails at once (ConfigError) instead of racing this one.
    Under `accelerate launch` only the main process (RANK 0) takes it."""
    from filelock import FileLock, Timeout

    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    _check_location(path, None)
    lock_file = path.with_name(f".{path.name}.lock")
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(lock_file, os.O_WRONLY | os.O_CREAT, 0o644))   # filelock reports a failure as Timeout
    except OSError as err:
        _remove_empty(made)
        raise ConfigError(f"--out {path}: cannot create files there ({err.strerror or err}); choose a folder you "
                          "can write") from None
    lock = FileLock(lock_file, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(f"another difflab command is writing {path} (it holds {lock_file}); wait for it to "
                          "finish or choose another --out") from None
    try:
        yield
    finally:
        lock_file.unlink(missing_ok=True)     # while held: a command that opened it before sees it unlinked
        lock.release()
        _remove_empty(made)


def _check_location(path: Path, suffixes: tuple[str, ...] | None) -> None:
    """The checks that need nothing to exist: a name, its length, and a folder to put it in."""
    if path.name in ("", ".", ".."):              # typer reads --out "" as "."
        shown = '""' if str(path) == "." else str(path)
        raise ConfigError(f"--out {shown} names no file or folder; give one, e.g. --out runs/model")
    if suffixes and path.suffix not in suffixes:
        raise ConfigError(f"--out {path} must end in one of {', '.join(suffixes)}")
    ancestor = next(folder for folder in path.parents if folder.exists())
    if not ancestor.is_dir():
        raise ConfigError(f"--out {path} lies under {ancestor}, which is a file, not a folder")
    _check_name_lengths(path, ancestor)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {path}: {ancestor} is not writable; choose a folder you can write")


def _check_name_lengths(path: Path, ancestor: Path) -> None:
    """Every name within the file system's limit, leaving room for the temporary beside the output."""
    name_max, path_max = _limit(ancestor, "PC_NAME_MAX", 255), _limit(ancestor, "PC_PATH_MAX", 4096)
    for depth, part in enumerate(path.parts, 1):
        limit = name_max - SIDE_FILE_ROOM if depth == len(path.parts) else name_max
        if len(os.fsencode(part)) > limit:
            raise ConfigError(f"--out {_shorten(str(path))}: the name {_shorten(part)} is {len(os.fsencode(part))} "
                              f"bytes; the file system allows {limit} here (difflab adds up to {SIDE_FILE_ROOM} for "
                              "its temporary and lock files)")
    if len(os.fsencode(str(path.absolute()))) + SIDE_FILE_ROOM >= path_max:
        raise ConfigError(f"--out {_shorten(str(path))} is longer than the file system allows ({path_max} bytes)")


def _limit(folder: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError):
        return default


def _shorten(text: str, keep: int = 40) -> str:
    return text if len(text) <= keep else f"{text[:keep]}…"


def _check_existing(path: Path, force: bool, suffixes: tuple[str, ...] | None, demo: bool) -> None:
    """An existing output: the right kind, written by difflab, and replaced only with --force."""
    if not os.path.lexists(path):
        return
    if demo:
        if not path.is_dir():
            raise ConfigError(f"--out {path} is a file; the demo writes a folder")
        if any(path.iterdir()) and not is_demo_folder(path):
            raise ConfigError(f"{path} is not empty and is not a difflab demo folder (no report.json or models/); "
                              "the demo writes only into an empty folder or one of its own: choose another --out")
        return                                    # a demo folder is reused (its trained models are cached there)
    if suffixes is not None and (path.is_dir() or not path.is_file()):
        raise ConfigError(f"--out {path} exists and is not a file; this command writes a {'/'.join(suffixes)} file")
    if suffixes is None and not path.is_dir():
        raise ConfigError(f"--out {path} is a file; this command writes a model folder")
    if suffixes is None and any(path.iterdir()) and not is_model_folder(path):
        raise ConfigError(f"{path} exists and is not a difflab model folder; difflab replaces only what it wrote, "
                          "even with --force: choose another --out")
    if not force:
        raise ConfigError(f"{path} already exists; pass --force to overwrite it")


def is_model_folder(path: Path) -> bool:
    """Whether `path` is a model folder difflab wrote: a config.json naming a class difflab loads (what
    `write_model_folder` writes), or a diffusers student folder whose difflab_student.json names one."""
    import difflab  # noqa: F401  (every package registers its kinds)
    from difflab.interop.diffusers.loader import STUDENT_FILE
    from difflab.models import registered_kinds

    for name in ("config.json", STUDENT_FILE):
        try:
            config = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and config.get("class") in registered_kinds():
            return True
    return False


def is_demo_folder(path: Path) -> bool:
    """Whether `path` is what `difflab demo` writes: its report.json, or its models/ of model folders."""
    try:
        report = json.loads((path / "report.json").read_text())
        if isinstance(report, dict) and "sections" in report:
            return True
    except (OSError, ValueError):
        pass
    models = path / "models"
    entries = [entry for entry in models.iterdir() if not entry.name.startswith(".")] if models.is_dir() else []
    return bool(entries) and all(entry.is_dir() and is_model_folder(entry) for entry in entries)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:                        # innermost first
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


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


@contextmanager
def progress_bar(description: str, total: int, enabled: bool):
    """`advance(k)`: a rich progress bar on stderr when it is a terminal, erased when done (so an error
    stays one line)."""
    from rich.console import Console

    console = Console(stderr=True)
    if not (enabled and console.is_terminal):
        yield lambda k: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda k: bar.advance(task, k)
