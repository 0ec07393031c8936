"""Determinism across processes: `difflab sample` under `accelerate launch --num_processes 2` writes
the same samples, bit for bit, as one process with the same seed (per-sample seeds; each process
runs whole batches of the single-process run, so even a network's float32 matmuls see the same
batch shapes). (Independence of the batch size: tests/apps/cli/test_streaming.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.core.wrappers import EDMDenoiser
from difflab.nets import MLP

SRC = Path(__file__).resolve().parents[1] / "src"


def _sample_command(model: Path, out: Path, solver: str) -> list[str]:
    # 13 samples in batches of 3: five batches, so with two processes the last round leaves one idle
    return ["-m", "difflab.apps.cli.app", "sample", "--model", str(model), "--solver", solver,
            "--nfe", "6", "--n", "13", "--batch-size", "3", "--seed", "11", "--out", str(out), "--device", "cpu"]


@pytest.mark.slow        # ~25 s on 2 cores: two interpreter start-ups under torchrun
@pytest.mark.timeout(300)
def test_two_processes_write_the_same_samples_as_one(tmp_path):
    torch.manual_seed(0)
    network = MLP(dim=3, hidden=32, depth=2, zero_init_output=False)     # random weights: a non-trivial map
    EDMDenoiser(network, sigma_data=1.0, data_shape=(3,)).save(tmp_path / "mlp")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    solver = "euler_maruyama"                                            # initial and per-step noise
    single = subprocess.run([sys.executable, *_sample_command(tmp_path / "mlp", tmp_path / "one.npz", solver)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    # `--multi_gpu` selects the torchrun launcher; with no GPU the processes join a gloo group
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29531"]
    double = subprocess.run([*launch, *_sample_command(tmp_path / "mlp", tmp_path / "two.npz", solver)],
                            env=env, capture_output=True, text=True, timeout=240)
    assert double.returncode == 0, double.stderr[-3000:]
    reports = [json.loads(line) for line in double.stdout.splitlines() if line.startswith("{")]
    assert [r["processes"] for r in reports] == [2]                     # only the main process reports
    one, two = np.load(tmp_path / "one.npz")["x"], np.load(tmp_path / "two.npz")["x"]
    assert one.shape == (13, 3) and np.isfinite(one).all()
    assert np.array_equal(one, two)
    assert len(np.unique(one[:, 0])) == 13                              # distinct seeds, distinct samples
