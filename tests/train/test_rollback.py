"""The loop's rollbacks: on a diverging loss it goes back to the state at the log point before (the last
healthy one: weights, EMA, Adam) with the learning rate halved, at most `rollbacks` times, and a resume
stays exact."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from difflab.core.errors import ConfigError, DivergenceWarning
from difflab.train import TrainConfig, fit
from difflab.train.contract import Divergence
from difflab.train.denoiser import DenoiserConfig
from difflab.train.loop import CHECKPOINT_NAME, HEALTHY_NAME

TARGET = 10.0
LR = 0.01
# lr 0.01 moves w by about 0.01 a step, so the loss (w − 10)², from 200, falls slowly and smoothly: no
# log interval is 2× the best by itself. Steps 30–34 are 1.5× (above the best, at step 30, but healthy: under
# 2×); steps 35–39 add 1e3·(w + 10)², logged at step 40 as ~1e3× the best: a divergence, whose rollback goes
# to the healthy state at step 35.
BUMP, SPIKE = range(30, 35), range(35, 40)


class Interrupted(Exception):
    pass


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))


def spiky_loss(stop_at: int | None = None):
    def loss_fn(model, generator, step, micro):
        if step == stop_at:
            raise Interrupted
        base = (model.w - TARGET).square().sum()
        if step in SPIKE:
            return base + 1e3 * (model.w + TARGET).square().sum()
        return 1.5 * base if step in BUMP else base

    return loss_fn


def config(train_steps: int = 50, checkpoint_every: int = 5) -> TrainConfig:
    return TrainConfig(train_steps=train_steps, lr=LR, warmup_steps=4, log_every=5,
                       checkpoint_every=checkpoint_every, device="cpu")


def run(rollbacks: int, train_steps: int = 50, out_dir=None, stop_at=None, checkpoint_every: int = 5):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergenceWarning)
        return fit(Pair(), spiky_loss(stop_at), config(train_steps, checkpoint_every), out_dir=out_dir,
                   progress=False, rollbacks=rollbacks)


def assert_same_state(a, b):
    for x, y in zip(a.raw_model.state_dict().values(), b.raw_model.state_dict().values()):
        assert torch.equal(x, y)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):   # the EMAs
        assert torch.equal(x, y)


def set_lr_in_checkpoint(path, lr: float) -> None:
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    groups = json.loads(meta["param_groups"])
    for group in groups:
        group["initial_lr"] = group["lr"] = lr
    save_file(tensors, path, metadata=meta | {"param_groups": json.dumps(groups)})


@pytest.mark.parametrize("rollbacks", [1, 3])
def test_a_rollback_continues_from_the_last_healthy_state_with_half_the_learning_rate(tmp_path, rollbacks):
    # the spike recurs after each rollback, so k rollbacks leave the state at step 35 going on at lr / 2^k
    rolled = run(rollbacks=rollbacks)
    # the same, by hand: train to the last healthy step (35), set the learning rate in its checkpoint, go on
    run(rollbacks=0, train_steps=35, out_dir=tmp_path)
    set_lr_in_checkpoint(tmp_path / CHECKPOINT_NAME, LR / 2**rollbacks)
    by_hand = run(rollbacks=0, out_dir=tmp_path)

    assert [(d.best_step, d.step) for d in rolled.rollbacks] == [(30, 40)] * rollbacks
    assert rolled.rollbacks[0].loss > 100 * rolled.rollbacks[0].best_loss
    assert rolled.history == by_hand.history         # steps 5..35 once, then 40..50 at the last rate
    assert_same_state(rolled, by_hand)               # weights, EMA: the optimiser state came back too


def test_each_rollback_halves_the_learning_rate_until_the_budget_is_spent():
    # the spike recurs after every rollback (same steps, same batches): three rollbacks, then it goes on
    lrs: list[float] = []
    with pytest.warns(DivergenceWarning, match=r"went back to step 35 .* \(rollback 3 of 3\)"):
        result = fit(Pair(), spiky_loss(), config(), progress=False, rollbacks=3,
                     callback=lambda step: lrs.append(step.lr))
    assert [(d.best_step, d.step) for d in result.rollbacks] == [(30, 40)] * 3
    assert sorted(set(lrs), reverse=True) == [LR, LR / 2, LR / 4, LR / 8]
    assert lrs[-1] == LR / 8                       # after the third rollback: no fourth halving
    steps = [step for step, _ in result.history]
    assert steps == list(range(5, 55, 5))          # each step logged once: the rolled-back ones were dropped


def test_without_rollbacks_the_loop_goes_on_through_the_spike():
    result = run(rollbacks=0)
    assert result.rollbacks == [] and max(loss for _, loss in result.history) > 1e4


def test_a_resumed_run_rolls_back_exactly_as_an_uninterrupted_one(tmp_path):
    uninterrupted = run(rollbacks=1)
    # checkpoints every 4 steps, logs every 5: stopped at step 38, the last checkpoint is at 36, after the
    # healthy state (35), which is kept beside it
    with pytest.raises(Interrupted):
        run(rollbacks=1, out_dir=tmp_path, stop_at=38, checkpoint_every=4)
    assert (tmp_path / HEALTHY_NAME).is_file()
    resumed = run(rollbacks=1, out_dir=tmp_path, checkpoint_every=4)
    assert resumed.rollbacks == uninterrupted.rollbacks and len(resumed.rollbacks) == 1   # the same losses too
    assert resumed.history == uninterrupted.history
    assert_same_state(resumed, uninterrupted)


def test_rollbacks_are_recorded_in_the_checkpoint(tmp_path):
    result = run(rollbacks=1, out_dir=tmp_path)
    with safe_open(tmp_path / CHECKPOINT_NAME, "pt") as f:
        saved = [Divergence(**d) for d in json.loads(f.metadata()["rollbacks"])]
    assert saved == result.rollbacks and len(saved) == 1


def test_a_negative_rollback_budget_is_refused():
    with pytest.raises(ConfigError, match="divergence_rollbacks"):
        DenoiserConfig(divergence_rollbacks=-1).validate()
