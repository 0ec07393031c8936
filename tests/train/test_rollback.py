"""The loop's rollbacks: on a diverging loss it goes back to the state at the best log point (weights,
EMA, Adam) with the learning rate halved, at most `rollbacks` times, and a resume stays exact."""
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
from difflab.train.loop import BEST_NAME, CHECKPOINT_NAME

TARGET = 10.0
LR = 0.01
# lr 0.01 moves w by about 0.01 a step, so the loss (w − 10)², from 200, falls slowly and smoothly: no
# log interval is 2× the best by itself. Steps 30–34 are 1.5× (above the best, not a divergence: the best
# stays at step 30); steps 35–39 add 1e3·(w + 10)², logged at step 40 as ~1e3× the best: a divergence.
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


def config(train_steps: int = 50, **overrides) -> TrainConfig:
    return TrainConfig(train_steps=train_steps, lr=LR, warmup_steps=4, log_every=5, checkpoint_every=5,
                       device="cpu", **overrides)


def run(rollbacks: int, train_steps: int = 50, out_dir=None, stop_at=None, lrs: list | None = None):
    callback = None if lrs is None else (lambda step: lrs.append(step.lr))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergenceWarning)
        return fit(Pair(), spiky_loss(stop_at), config(train_steps), out_dir=out_dir, progress=False,
                   rollbacks=rollbacks, callback=callback)


def assert_same_state(a, b):
    for x, y in zip(a.raw_model.state_dict().values(), b.raw_model.state_dict().values()):
        assert torch.equal(x, y)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):   # the EMAs
        assert torch.equal(x, y)


def halve_lr_in_checkpoint(path) -> None:
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    groups = json.loads(meta["param_groups"])
    for group in groups:
        group["initial_lr"] = group["lr"] = LR / 2
    save_file(tensors, path, metadata=meta | {"param_groups": json.dumps(groups)})


def test_a_rollback_continues_from_the_best_state_with_half_the_learning_rate(tmp_path):
    rolled = run(rollbacks=1)
    # the same, by hand: train to the best step (30), halve the learning rate in its checkpoint, go on
    run(rollbacks=0, train_steps=30, out_dir=tmp_path)
    halve_lr_in_checkpoint(tmp_path / CHECKPOINT_NAME)
    by_hand = run(rollbacks=0, out_dir=tmp_path)

    assert [d.best_step for d in rolled.rollbacks] == [30] and [d.step for d in rolled.rollbacks] == [40]
    assert rolled.rollbacks[0].loss > 100 * rolled.rollbacks[0].best_loss
    assert rolled.history == by_hand.history         # steps 5..30 once, then 35..50 at lr/2 (spike again)
    assert_same_state(rolled, by_hand)               # weights, EMA: the optimiser state came back too


def test_each_rollback_halves_the_learning_rate_until_the_budget_is_spent():
    # the spike recurs after every rollback (same steps, same batches): three rollbacks, then it goes on
    lrs: list[float] = []
    with pytest.warns(DivergenceWarning, match=r"went back to step 30 .* \(rollback 3 of 3\)"):
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
    with pytest.raises(Interrupted):                 # stops at step 37: last checkpoint at 35, after the best (30)
        run(rollbacks=1, out_dir=tmp_path, stop_at=37)
    assert (tmp_path / BEST_NAME).is_file()          # the state at step 30, kept beside the checkpoint
    resumed = run(rollbacks=1, out_dir=tmp_path)
    assert resumed.rollbacks == uninterrupted.rollbacks
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
