"""Checkpoints of another run are never continued silently: refused with the differing field named,
or, with --force, started afresh; a checkpoint of the same run is continued (--checkpoint-every
sets how often they are written)."""
from __future__ import annotations

import hashlib
import shutil

import pytest

from tests.apps.cli.helpers import run

pytestmark = pytest.mark.reliability("checkpoints")


def train(out, capsys, *extra):
    return run(["train", "--data", "moons", "--train-steps", 12, "--checkpoint-every", 4, "--channels", 16,
                "--device", "cpu", "--out", out, *extra], capsys)


def sha256(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_another_runs_checkpoint_is_refused_naming_the_difference(tmp_path, capsys):
    code, _, err = train(tmp_path / "a", capsys, "--lr", "0.002")
    assert code == 0, err
    shutil.copytree(tmp_path / "a.checkpoints", tmp_path / "b.checkpoints")   # stale: another run's
    code, out, err = train(tmp_path / "b", capsys, "--lr", "0.01")
    assert code == 2 and "lr" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_force_starts_afresh_over_another_runs_checkpoint(tmp_path, capsys):
    assert train(tmp_path / "fresh", capsys, "--lr", "0.01")[0] == 0          # the run as it should be
    assert train(tmp_path / "a", capsys, "--lr", "0.002")[0] == 0
    code, _, err = train(tmp_path / "a", capsys, "--lr", "0.01", "--force")   # a.checkpoints: the lr=0.002 run's
    assert code == 0, err
    assert sha256(tmp_path / "a") == sha256(tmp_path / "fresh")


def test_force_still_continues_a_checkpoint_of_the_same_run(tmp_path, capsys):
    """The checkpoint's weights are marked (+1 on one tensor, its run record kept): a continued run
    carries the mark, a restarted one would equal the uninterrupted run."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    assert train(tmp_path / "whole", capsys, "--train-steps", 16)[0] == 0
    assert train(tmp_path / "a", capsys)[0] == 0                               # 12 steps, checkpoint at 12
    checkpoint = tmp_path / "a.checkpoints" / "checkpoint.safetensors"
    tensors = load_file(checkpoint)
    with safe_open(checkpoint, "pt") as f:
        metadata = f.metadata()
    key = next(k for k in sorted(tensors) if k.startswith("model.") and tensors[k].is_floating_point())
    tensors[key] = tensors[key] + 1
    save_file(tensors, checkpoint, metadata=metadata)
    code, _, err = train(tmp_path / "a", capsys, "--train-steps", 16, "--force")
    assert code == 0, err
    assert sha256(tmp_path / "a") != sha256(tmp_path / "whole")
