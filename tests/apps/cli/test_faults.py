"""Fault injection: every fitting command, run as a real `difflab` subprocess, SIGKILLed at a random
point after its first checkpoint and then rerun with the same arguments, ends as if nothing had
happened: exit status 0, a model.safetensors bit-identical (SHA-256) to an uninterrupted run's, and
the same files as that run, with nothing half-written left anywhere (no `.NAME.*.tmp`, `.NAME.old`
or `.NAME.lock`).

The kill point is drawn from a seeded RNG (DIFFLAB_FAULT_SEED, default 0): a checkpoint step to wait
for, then a delay of up to 30 ms, so the kill lands mid-step or mid-write. No hook in difflab: the
parent watches the checkpoints' `step` metadata. Base models (a class-conditional MLP on moons and its
guided student) are trained once per module, in-process.
"""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from difflab.apps.cli.app import main
from difflab.train.loop import CHECKPOINT_NAME

SRC = Path(__file__).resolve().parents[3] / "src"
SEED = int(os.environ.get("DIFFLAB_FAULT_SEED", "0"))
KILL_DELAY_MAX_S = 0.03
RUN_TIMEOUT_S = 120
BASE, STUDENT = "@base", "@student"      # replaced by the module's base model and guided student

# Each fitting command with tiny settings: (arguments, checkpoint steps it writes in all). The kill
# waits for a drawn number of those steps, at most KILL_BY of them, so the output never exists yet.
COMMON = ["--checkpoint-every", "5", "--device", "cpu", "--seed", "3", "--out", "out"]
FITS: dict[str, tuple[list[str], int]] = {
    "train": (["train", "--data", "moons", "--train-steps", "120", "--batch-size", "32", "--channels", "16"], 120),
    "amed fit": (["amed", "fit", "--model", BASE, "--nfe", "3", "--trajectories", "240", "--batch-size", "8",
                  "--M", "1"], 60),   # 30 batches x 2 intervals
    "condition fit": (["condition", "fit", "--model", BASE, "--task", "inpaint", "--pairs", "64",
                       "--train-steps", "120", "--batch-size", "16"], 120),
    "distill guided": (["distill", "guided", "--teacher", BASE, "--train-steps", "120", "--batch-size", "16"], 120),
    "distill progressive": (["distill", "progressive", "--teacher", STUDENT, "--from-steps", "4", "--to-steps", "1",
                             "--train-steps-per-round", "60", "--batch-size", "16"], 120),   # 2 rounds x 60
}
KILL_BY = 0.6           # the kill waits for at most this fraction of the checkpoint steps


def run_in_process(argv: list[str]) -> None:
    old, sys.argv = sys.argv, ["difflab", *argv]
    try:
        main()
    except SystemExit as exit_:
        assert not exit_.code, f"difflab {' '.join(argv)} failed with status {exit_.code}"
    finally:
        sys.argv = old


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, str]:
    """A class-conditional MLP on moons and its guided student (the inputs of the other commands)."""
    folder = tmp_path_factory.mktemp("bases")
    base, student = folder / "base", folder / "student"
    run_in_process(["train", "--data", "moons", "--conditional", "--train-steps", "40", "--batch-size", "32",
                    "--channels", "16", "--device", "cpu", "--out", str(base)])
    run_in_process(["distill", "guided", "--teacher", str(base), "--train-steps", "10", "--batch-size", "16",
                    "--device", "cpu", "--out", str(student)])
    return {BASE: str(base), STUDENT: str(student)}


def start(argv: list[str], folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "difflab.apps.cli.app", *argv], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, what: str) -> None:
    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"{what}: status {proc.returncode}\n{err.decode()[-3000:]}"


def checkpoint_steps(folder: Path) -> int:
    """The optimiser steps the checkpoints under `folder` record, summed (progressive: over its rounds)."""
    total = 0
    for checkpoint in folder.rglob(CHECKPOINT_NAME):
        try:
            with safe_open(checkpoint, "pt") as f:
                total += int(f.metadata()["step"])
        except (OSError, KeyError, ValueError, RuntimeError):   # replaced while we read it: look again
            pass
    return total


def kill_after(proc: subprocess.Popen, folder: Path, steps: int, delay: float, what: str) -> None:
    """SIGKILL `proc` `delay` seconds after its checkpoints under `folder` reach `steps` steps."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while checkpoint_steps(folder) < steps:
        assert proc.poll() is None, f"{what} ended before the kill:\n{proc.stderr.read().decode()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}: no checkpoint reached step {steps}"
        time.sleep(0.002)
    time.sleep(delay)
    assert proc.poll() is None, f"{what} finished before the kill (draw a kill point earlier)"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.reliability("checkpoints")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("command", list(FITS))
def test_a_fit_killed_at_a_random_point_resumes_to_the_uninterrupted_result(command, bases, tmp_path):
    template, checkpoint_total = FITS[command]
    argv = [bases.get(arg, arg) for arg in template] + COMMON
    rng = random.Random(f"{SEED}/{command}")
    kill_steps, delay = rng.randint(1, int(KILL_BY * checkpoint_total)), rng.uniform(0, KILL_DELAY_MAX_S)
    where = f"difflab {command} killed after {kill_steps} checkpoint steps + {delay * 1e3:.0f} ms (seed {SEED})"
    killed, whole = tmp_path / "killed", tmp_path / "whole"

    uninterrupted = start(argv, whole)        # alongside the killed run: two cores
    victim = start(argv, killed)
    kill_after(victim, killed, kill_steps, delay, where)
    assert not (killed / "out").exists(), f"{where}: killed too late, the output exists"
    finish(start(argv, killed), f"{where}, rerun")
    finish(uninterrupted, f"difflab {command}, uninterrupted")

    assert sha256(killed / "out" / "model.safetensors") == sha256(whole / "out" / "model.safetensors"), where
    assert listing(killed) == listing(whole), where            # no extra file, none missing
    leftovers = [name for name in listing(killed) if any(part.startswith(".") for part in Path(name).parts)]
    assert leftovers == [], f"{where}: half-written or lock files left: {leftovers}"
