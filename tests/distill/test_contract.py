"""Both distillation stages follow difflab's one fitting contract (train/contract.py): a config that
round-trips through JSON and refuses unknown keys, callbacks that receive `Step` records, a `FitResult`
with the loss history and timings, and the config recorded in the saved student."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import difflab
from difflab import CFGDenoiser, GaussianMixture
from difflab.core.errors import ConfigError
from difflab.distill import (
    GuidedDistillConfig,
    GuidedStudent,
    PredictionDenoiser,
    ProgressiveDistillConfig,
    dataset_batches,
    distill_guided,
    distill_progressive,
)
from difflab.nets import MLP
from difflab.train.contract import FitResult, Step


def tiny_setup():
    """(exact guided teacher, fresh tiny w-conditioned student, batches) on a two-class 2-D mixture."""
    mixture = GaussianMixture([[-2.0, 0.0], [2.0, 1.0]], [0.5, 0.7], [0.5, 0.5], labels=[0, 1])
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (256,), generator=gen)
    x = mixture.sample(256, generator=gen, class_labels=labels)
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=16, depth=1, embed_dim=8, num_classes=2, extra_embed=True)
    student = GuidedStudent(PredictionDenoiser(net, "v", sigma_min=0.002, sigma_max=80.0, data_shape=(2,)))
    return CFGDenoiser(mixture), student, dataset_batches(x, labels)


@pytest.mark.parametrize("config", [
    GuidedDistillConfig(train_steps=7, lr=5e-4, batch_size=32, w_range=(0.5, 3.0), seed=3, device="cpu"),
    ProgressiveDistillConfig(from_steps=16, to_steps=2, train_steps_per_round=5, batch_size=8, w_range=(1.0, 2.0)),
    ProgressiveDistillConfig(from_steps=4, to_steps=1, w_range=None),      # a model without w
])
def test_configs_round_trip_through_json(config):
    again = type(config).from_json(config.to_json())
    assert again == config and again.to_dict() == config.to_dict()
    assert again.w_range is None or isinstance(again.w_range, tuple)


@pytest.mark.parametrize("cls", [GuidedDistillConfig, ProgressiveDistillConfig])
def test_unknown_keys_are_refused(cls):
    with pytest.raises(ConfigError, match="w_rnage"):
        cls.from_dict({**cls().to_dict(), "w_rnage": [0, 4]})


def test_progressive_train_steps_is_the_total_over_the_rounds():
    config = ProgressiveDistillConfig(from_steps=8, to_steps=1, train_steps_per_round=10)
    assert config.rounds() == [4, 2, 1] and config.train_steps == 30
    assert [config.student_steps_at(s) for s in (1, 10, 11, 20, 21, 30)] == [4, 4, 2, 2, 1, 1]
    assert dataclasses.replace(config, from_steps=4).train_steps == 20      # derived again, not copied
    with pytest.raises(ConfigError, match="train_steps_per_round"):
        ProgressiveDistillConfig.from_dict({**config.to_dict(), "train_steps": 10})
    with pytest.raises(ConfigError, match="power of two"):
        ProgressiveDistillConfig(from_steps=6, to_steps=1)


def test_guided_callback_gets_steps_and_the_result_has_history_and_saves_its_config(tmp_path):
    teacher, student, batches = tiny_setup()
    config = GuidedDistillConfig(train_steps=4, log_every=2, warmup_steps=1, batch_size=8, w_range=(0.0, 2.0),
                                 checkpoint_every=10, device="cpu")
    records: list[Step] = []
    result = distill_guided(teacher, student, batches, config, callback=records.append, progress=False)
    assert isinstance(result, FitResult) and isinstance(result.model, GuidedStudent)
    assert all(isinstance(r, Step) for r in records) and [r.step for r in records] == [2, 4]
    assert all(r.total == 4 for r in records)
    assert result.history == [(r.step, r.loss) for r in records] and result.final_loss == records[-1].loss
    assert result.timings["total"] > 0
    result.model.save(tmp_path / "student")
    saved = difflab.load(tmp_path / "student")
    assert saved.distilled["w_max"] == 2.0 and saved.distilled["stage"] == "guided"
    assert GuidedDistillConfig.from_dict(saved.distilled["fit"]) == config


def test_progressive_steps_history_and_timings_span_the_rounds(tmp_path):
    teacher, student, batches = tiny_setup()
    config = ProgressiveDistillConfig(from_steps=4, to_steps=1, train_steps_per_round=3, log_every=3, batch_size=8,
                                      warmup_steps=1, checkpoint_every=10, device="cpu")
    records: list[Step] = []
    result = distill_progressive(student, batches, config, teacher=teacher, out_dir=tmp_path / "rounds",
                                 callback=records.append, progress=False)
    assert [(r.step, r.total) for r in records] == [(3, 6), (6, 6)]
    assert [config.student_steps_at(r.step) for r in records] == [2, 1]
    assert records[1].elapsed >= records[0].elapsed
    assert result.history == [(r.step, r.loss) for r in records]
    assert set(result.timings) == {"steps-0002", "steps-0001", "total"}
    assert result.model.steps == 1 and not result.model.training
    saved = difflab.load(tmp_path / "rounds" / "steps-0001")
    assert ProgressiveDistillConfig.from_dict(saved.distilled["fit"]) == config
