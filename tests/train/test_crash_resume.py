"""Crash safety: a training run killed with SIGKILL mid-way (a real subprocess) resumes from its last
atomic checkpoint and finishes bit-exactly as an uninterrupted run with the same seed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from difflab.train.loop import CHECKPOINT_NAME

SRC = Path(__file__).resolve().parents[2] / "src"

SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from difflab.core.wrappers import EDMDenoiser
    from difflab.nets import MLP
    from difflab.train import TrainConfig, fit
    from difflab.train.denoiser import denoiser_loss

    out, slow = sys.argv[1], sys.argv[2] == "slow"
    x = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = EDMDenoiser(MLP(dim=2, hidden=32, depth=2, zero_init_output=False), sigma_data=1.0)
    loss = denoiser_loss(x, None, 64, sigma_data=1.0)

    def slow_loss(m, g, step, micro):   # give the parent time to kill us after a checkpoint
        if slow:
            time.sleep(0.02)
        return loss(m, g, step, micro)

    config = TrainConfig(train_steps=120, lr=1e-2, warmup_steps=5, checkpoint_every=20, log_every=10, device="cpu")
    fit(model, slow_loss, config, out_dir=out, progress=False)
""")


def run_script(tmp_path: Path, out: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(out), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def checkpoint_step(folder: Path) -> int:
    with safe_open(folder / CHECKPOINT_NAME, "pt") as f:
        return int(f.metadata()["step"])


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(folder / CHECKPOINT_NAME, "pt") as f:
        names = f.keys()   # a safe_open handle is not iterable: ask it for its tensor names
        return {name: f.get_tensor(name) for name in names}


@pytest.mark.reliability("checkpoints")
@pytest.mark.timeout(240)
def test_sigkilled_run_resumes_bit_exactly(tmp_path):
    killed = tmp_path / "killed"
    proc = run_script(tmp_path, killed, "slow")
    deadline = time.time() + 180
    while time.time() < deadline:                      # wait for a checkpoint past step 40, then kill
        if (killed / CHECKPOINT_NAME).is_file() and checkpoint_step(killed) >= 40:
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = checkpoint_step(killed)
    assert 40 <= step_at_kill < 120                    # killed mid-run, after at least two checkpoints
    assert not [p for p in killed.iterdir() if p.name != CHECKPOINT_NAME and not p.name.startswith(".")]

    resumed = run_script(tmp_path, killed, "fast")
    uninterrupted = run_script(tmp_path, tmp_path / "full", "fast")
    for p in (resumed, uninterrupted):
        assert p.wait(timeout=180) == 0, p.stderr.read().decode()[-2000:]

    a, b = checkpoint_tensors(killed), checkpoint_tensors(tmp_path / "full")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)      # model, EMA and Adam state, bit for bit
    with safe_open(killed / CHECKPOINT_NAME, "pt") as f, safe_open(tmp_path / "full" / CHECKPOINT_NAME, "pt") as g:
        assert f.metadata()["losses"] == g.metadata()["losses"]   # the same loss sequence
