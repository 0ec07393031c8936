"""The Accelerate training loop: exact resume, atomic checkpoints, multi-process, and that the EDM
loss trains a denoiser towards the exact one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from difflab.core.errors import ConfigError, DivergenceWarning, ModelFormatError
from difflab.core.mixture import GaussianMixture
from difflab.nets import MLP
from difflab.train import TrainConfig, fit
from difflab.train.contract import loss_divergence
from difflab.train.denoiser import DenoiserConfig, denoiser_loss, edm_loss, train_denoiser
from difflab.train.loop import CHECKPOINT_NAME

SRC = Path(__file__).resolve().parents[2] / "src"


def small_problem(init_seed: int = 0):
    x = torch.randn(512, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 0.3]) + 1.0
    torch.manual_seed(init_seed)
    net = MLP(dim=2, hidden=32, depth=2, zero_init_output=False)  # so the init seed matters
    from difflab.core.wrappers import EDMDenoiser
    return EDMDenoiser(net, sigma_data=1.0), denoiser_loss(x, None, 64, sigma_data=1.0)


def test_edm_loss_is_the_weighted_error_of_the_draws():
    # D = 0 gives loss mean λ(σ)·x0² with the same σ draws: recompute from the same generator.
    x0 = torch.randn(16, 3, dtype=torch.float64)
    zero = lambda x, sigma: torch.zeros_like(x)
    loss = edm_loss(zero, x0, torch.Generator().manual_seed(3), p_mean=-1.2, p_std=1.2, sigma_data=0.5)
    g = torch.Generator().manual_seed(3)
    sigma = (-1.2 + 1.2 * torch.randn(16, generator=g, dtype=torch.float64)).exp()
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert torch.allclose(loss, (weight[:, None] * x0**2).mean(), rtol=1e-12)
    # an oracle that returns x0 exactly has zero loss
    oracle = lambda x, sigma: x0
    assert edm_loss(oracle, x0, torch.Generator().manual_seed(3)) == 0


def test_resume_continues_bit_exactly(tmp_path):
    config = TrainConfig(train_steps=12, lr=1e-2, warmup_steps=4, checkpoint_every=6, log_every=3, device="cpu")
    full_model, loss_fn = small_problem()
    full = fit(full_model, loss_fn, config, out_dir=tmp_path / "full", progress=False)

    first_model, loss_fn = small_problem()
    fit(first_model, loss_fn, TrainConfig(**{**config.__dict__, "train_steps": 6}), out_dir=tmp_path / "split",
        progress=False)
    resumed_model, loss_fn = small_problem(init_seed=1)   # different init: everything must come from the checkpoint
    resumed = fit(resumed_model, loss_fn, config, out_dir=tmp_path / "split", progress=False)

    assert resumed.history == full.history                     # same loss sequence, exactly
    assert (full.start_step, resumed.start_step) == (0, 6)     # its timings cover steps 6-12 only
    for a, b in zip(full.raw_model.state_dict().values(), resumed.raw_model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):   # the EMAs
        assert torch.equal(a, b)
    leftovers = [p.name for p in (tmp_path / "split").iterdir() if p.name != CHECKPOINT_NAME]
    assert leftovers == []                                     # the temp file was renamed, not left behind


def test_a_resume_between_log_points_logs_the_same_means(tmp_path):
    # checkpoints every 4 steps, logs every 5: stopped during step 7, the run resumes from step 4, and the
    # mean logged at step 10 must still cover steps 6-10 (the checkpoint keeps the losses since step 5)
    config = TrainConfig(train_steps=12, lr=1e-2, warmup_steps=4, checkpoint_every=4, log_every=5, device="cpu")
    full_model, loss_fn = small_problem()
    full = fit(full_model, loss_fn, config, progress=False)

    def stop_at_step_7(model, generator, step, micro):
        if step == 6:
            raise KeyboardInterrupt
        return loss_fn(model, generator, step, micro)

    first_model, _ = small_problem()
    with pytest.raises(KeyboardInterrupt):
        fit(first_model, stop_at_step_7, config, out_dir=tmp_path, progress=False)
    resumed_model, loss_fn = small_problem(init_seed=1)
    resumed = fit(resumed_model, loss_fn, config, out_dir=tmp_path, progress=False)
    assert resumed.history == full.history


def test_corrupt_checkpoint_is_refused_with_a_clear_error(tmp_path):
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a safetensors file")
    model, loss_fn = small_problem()
    with pytest.raises(ModelFormatError, match="cannot resume"):
        fit(model, loss_fn, TrainConfig(train_steps=2, device="cpu"), out_dir=tmp_path, progress=False)


def test_bad_config_is_refused_before_work():
    model, loss_fn = small_problem()
    with pytest.raises(ConfigError):
        fit(model, loss_fn, TrainConfig(train_steps=0), progress=False)
    with pytest.raises(ConfigError):
        fit(model, loss_fn, TrainConfig(mixed_precision="fp8"), progress=False)


def test_trained_mlp_approaches_the_exact_mixture_denoiser():
    truth = GaussianMixture([[-1.5, 0.0], [1.5, 0.5]], stds=[0.3, 0.5], weights=[0.4, 0.6])
    data = truth.sample(8000, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    config = DenoiserConfig(train_steps=600, lr=3e-3, warmup_steps=50, ema_decay=0.99, device="cpu", batch_size=256)
    result = train_denoiser(MLP(dim=2, hidden=64, depth=3), data, config=config, progress=False)
    denoiser = result.model
    assert result.history[-1][1] < result.history[0][1]
    for sigma in (0.3, 1.0, 3.0):
        x = truth.sample(2000, generator=torch.Generator().manual_seed(1)) + sigma * torch.randn(2000, 2)
        s = torch.full((2000,), sigma)
        with torch.no_grad():
            error = (denoiser(x, s) - truth(x, s)).square().sum(1).mean().sqrt()
        baseline = (x.mean(0) - truth(x, s)).square().sum(1).mean().sqrt()  # best constant guess
        # a wrong preconditioning or loss weight leaves the error near the constant baseline
        assert error < 0.25 * baseline, (sigma, float(error), float(baseline))


@pytest.mark.timeout(300)
def test_two_cpu_processes_both_take_part_and_the_result_loads(tmp_path):
    script = tmp_path / "train2.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, torch
        from difflab.nets import MLP
        from difflab.train.denoiser import DenoiserConfig, train_denoiser
        x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
        res = train_denoiser(MLP(dim=2, hidden=16, depth=1), x, config=DenoiserConfig(train_steps=4, log_every=2,
                             device="cpu", batch_size=32), progress=False)
        den = res.model
        with open(r"{tmp_path}/rank" + str(res.process_index) + ".json", "w") as f:
            json.dump({{"rank": res.process_index, "processes": res.num_processes}}, f)
        if res.is_main_process:
            den.save(r"{tmp_path}/model")
    """))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    # `--multi_gpu` selects accelerate's torchrun launcher; with no GPU the loop's Accelerator(cpu=True)
    # joins a gloo process group (`--cpu` would instead run a single process).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29517", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(json.loads((tmp_path / f"rank{r}.json").read_text())["rank"] for r in range(2))
    assert ranks == [0, 1]
    assert json.loads((tmp_path / "rank0.json").read_text())["processes"] == 2
    from difflab import load
    model = load(tmp_path / "model")
    assert model(torch.zeros(3, 2), torch.ones(3)).shape == (3, 2)


# ----- divergence: a loss that rises far above its best is reported ----------------------------------
# The logged means of the MNIST class-conditional U-Net that diverged on a 2-core AMD EPYC (2,400 steps,
# lr 2e-3, batch 64; condensed): it fell to 0.126 by step 1625, crept up, then jumped.
DIVERGED_MNIST = [(25, 1.229), (100, 0.332), (200, 0.173), (1000, 0.138), (1625, 0.126), (1650, 0.130),
                  (1700, 0.134), (1725, 0.756), (1750, 1.302), (2400, 0.641)]


def test_a_jump_to_twice_the_best_loss_is_named_with_both_steps():
    divergence = loss_divergence(DIVERGED_MNIST)
    assert (divergence.best_step, divergence.best_loss, divergence.step, divergence.loss) == (1625, 0.126, 1725, 0.756)
    assert "step 1625" in str(divergence) and "step 1725" in str(divergence)


def test_a_falling_noisy_loss_is_no_divergence():
    # warm-up noise and ±30% wobble around a falling trend stay below 2x the best so far
    wobble = [(25 * (k + 1), (1.0 / (k + 1)) * (1.3 if k % 2 else 0.8)) for k in range(40)]
    assert loss_divergence(wobble) is None
    assert loss_divergence([]) is None and loss_divergence([(1, 5.0)]) is None


def test_the_threshold_is_factor_times_the_best_before_it():
    # exactly `factor` x the best is a divergence, just below is not; a later best resets the reference
    assert loss_divergence([(1, 0.5), (2, 1.0)]).step == 2
    assert loss_divergence([(1, 0.5), (2, 0.999)]) is None
    assert loss_divergence([(1, 0.5), (2, 0.2), (3, 0.45)], factor=2.0).best_step == 2
    assert loss_divergence([(1, 0.5), (2, 0.2), (3, 0.35)], factor=2.0) is None
    assert loss_divergence([(1, 0.5), (2, 1.4)], factor=3.0) is None


def _train_with_a_jump(spike: float, rollbacks: int = 0) -> list[warnings.WarningMessage]:
    """Train a small denoiser on data that jump in scale after step 30 (the EDM loss, weighted by σ_data = 1,
    fixed, jumps with them); the DivergenceWarnings it gave."""
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=16, depth=1)
    x = torch.randn(64, 2)
    config = DenoiserConfig(train_steps=40, log_every=5, batch_size=64, sigma_data=1.0, device="cpu",
                            divergence_rollbacks=rollbacks)
    calm = denoiser_loss(x, None, 64, sigma_data=1.0)
    wild = denoiser_loss(x * spike, None, 64, sigma_data=1.0)
    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("always")
        patch.setattr("difflab.train.denoiser.denoiser_loss", lambda *a, **k: lambda model, generator, step, micro: (
            calm if step < 30 else wild)(model, generator, step, micro))
        train_denoiser(net, x, None, config, progress=False)
    return [w for w in caught if issubclass(w.category, DivergenceWarning)]


@pytest.mark.parametrize(("spike", "warns"), [(1e4, True), (1.0, False)])
def test_training_a_denoiser_warns_when_its_loss_diverges(spike, warns):
    divergence = _train_with_a_jump(spike)
    assert bool(divergence) is warns
    if warns:
        assert "training MLP on custom: the loss rose from" in str(divergence[0].message)
        assert "to " in str(divergence[0].message) and "at step 35" in str(divergence[0].message)


def test_warnings_point_at_the_users_line_not_into_difflab():
    # the rollback's warning arises in fit, two calls deep (here → _train_with_a_jump → train_denoiser → fit);
    # the jump persists after it, so train_denoiser warns too. Both name this file, the first one outside difflab.
    divergence = _train_with_a_jump(1e4, rollbacks=1)
    assert ["went back to step" in str(w.message) for w in divergence] == [True, False]
    assert {w.filename for w in divergence} == {__file__}
