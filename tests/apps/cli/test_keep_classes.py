"""`difflab train --keep-classes`: only the samples of the listed classes reach the training loop, the
model folder records the classes, and a data set without labels or without one of the classes is
refused with one line before any output (model folder or checkpoints) is made."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import difflab
import difflab.train.denoiser as denoiser_module
from difflab.data import load_digits, make_moons
from tests.apps.cli.helpers import run

TRAIN = ["train", "--channels", "8", "--train-steps", "1", "--batch-size", "4", "--device", "cpu", "--out", "m"]


@pytest.fixture
def trained_on(monkeypatch, tmp_path):
    """The (x, labels) of every train_denoiser call the command makes, run in an empty folder."""
    monkeypatch.chdir(tmp_path)
    calls = []
    real = denoiser_module.train_denoiser

    def spy(net, x, labels=None, *args, **kwargs):
        calls.append((x.clone(), None if labels is None else labels.clone()))
        return real(net, x, labels, *args, **kwargs)

    monkeypatch.setattr(denoiser_module, "train_denoiser", spy)
    return calls


@pytest.mark.parametrize("keep", [["--keep-classes", "3", "5"],                                  # one flag
                                  ["--keep-classes", "5", "--keep-classes", "3", "--keep-classes", "5"]])
@pytest.mark.parametrize("conditional", [False, True])
def test_only_the_kept_classes_reach_the_training_loop(trained_on, capsys, keep, conditional):
    flags = ["--conditional"] if conditional else []
    code, out, err = run([*TRAIN, "--data", "digits", *keep, *flags], capsys)
    assert code == 0, err
    digits = load_digits("train")
    wanted = (digits.labels == 3) | (digits.labels == 5)
    [(x, labels)] = trained_on
    assert torch.equal(x, digits.x[wanted])                     # the same images, in the data set's order
    if conditional:
        assert torch.equal(labels, digits.labels[wanted])       # labels unchanged: class 3 is still 3
    else:
        assert labels is None
    model = difflab.load("m")
    assert model.meta["kept_classes"] == [3, 5] and model.meta["dataset"] == "digits"
    assert model.net.config["num_classes"] == model.meta["num_classes"] == (10 if conditional else 0)
    code, out, _ = run(["info", "--model", "m"], capsys)
    assert code == 0 and json.loads(out)["kept_classes"] == [3, 5]


def test_without_the_option_every_class_is_kept_and_none_recorded(trained_on, capsys):
    code, _, err = run([*TRAIN, "--data", "digits"], capsys)
    assert code == 0, err
    assert len(trained_on[0][0]) == len(load_digits("train"))
    assert "kept_classes" not in difflab.load("m").meta


@pytest.mark.parametrize("data, keep, message", [
    ("gmm", ["0"], "needs labels, but data set 'gmm' has none"),
    ("digits", ["3", "10"], "has no samples of class(es) [10]"),
    ("digits", ["-1"], "has no samples of class(es) [-1]"),     # the null label is not a class of the data
    ("moons", ["0", "2"], "its classes are [0, 1]"),
    ("digits", ["three"], "Invalid value for '--keep-classes'"),
])
def test_a_class_the_data_lack_is_refused_before_any_output(trained_on, tmp_path, capsys, data, keep, message):
    code, out, err = run([*TRAIN, "--data", data, "--keep-classes", *keep], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error:") and message in err and err.count("\n") == 1, err
    assert trained_on == [] and list(tmp_path.iterdir()) == []  # no model folder, no checkpoints


@pytest.fixture
def kept_model(trained_on, capsys):
    """A class-conditional digits model trained (one step) on classes 3 and 5 only, folder "m"."""
    code, _, err = run([*TRAIN, "--data", "digits", "--conditional", "--keep-classes", "3", "5"], capsys)
    assert code == 0, err
    digits = load_digits("train")
    return digits.x[(digits.labels == 3) | (digits.labels == 5)]


SAMPLE = ["--nfe", "2", "--n", "2", "--device", "cpu"]


@pytest.mark.parametrize("argv, message", [
    (["sample", "--model", "m", "--class", "7", "--solver", "euler", *SAMPLE, "--out", "s.npz"],
     "--class 7: this model's classes are [3, 5]"),
    (["compose", "--model", "m", "--classes", "3", "7", *SAMPLE, "--out", "c.npz"],
     "class label(s) [7] not among the classes m was trained on, [3, 5]"),
])
def test_a_class_the_model_never_saw_is_refused(kept_model, capsys, argv, message):
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err, err
    assert not any(Path(name).exists() for name in ("s.npz", "c.npz"))


def test_a_class_the_model_saw_samples(kept_model, capsys):
    code, _, err = run(["sample", "--model", "m", "--class", "5", "--solver", "euler", *SAMPLE, "--out", "s.npz"],
                       capsys)
    assert code == 0, err


@pytest.mark.parametrize("data", [[], ["--data", "digits"]])
def test_condition_fit_draws_only_the_kept_classes(kept_model, monkeypatch, capsys, data):
    import difflab.condition.deft as deft_module

    real_fit, seen = deft_module.fit_deft, []

    def spy(base, operator, x0_data, **kwargs):
        seen.append(x0_data)
        return real_fit(base, operator, x0_data, **kwargs)

    monkeypatch.setattr(deft_module, "fit_deft", spy)
    code, _, err = run(["condition", "fit", "--model", "m", "--task", "superres", *data, "--pairs", "100",
                        "--train-steps", "1", "--batch-size", "4", "--out", "h", "--device", "cpu"], capsys)
    assert code == 0, err
    assert torch.equal(seen[0], kept_model[:100])


def test_condition_run_simulates_held_out_digits_of_the_kept_classes(kept_model, capsys):
    code, _, err = run(["condition", "run", "--model", "m", "--method", "dps", "--task", "superres", "--simulate", "3",
                        "--solver", "euler", "--nfe", "2", "--out", "r.npz", "--device", "cpu"], capsys)
    assert code == 0, err
    test = load_digits("test")
    assert np.array_equal(np.load("r.npz")["truth"], test.x[(test.labels == 3) | (test.labels == 5)][:3].numpy())


@pytest.mark.parametrize("data", [[], ["--data", "digits"]])
def test_distillation_diffuses_only_the_kept_classes_and_the_students_record_them(kept_model, monkeypatch, capsys,
                                                                                 data):
    import difflab.distill as distill_module

    real_batches, seen = distill_module.dataset_batches, []

    def spy(x, labels=None):
        seen.append((x, labels))
        return real_batches(x, labels)

    monkeypatch.setattr(distill_module, "dataset_batches", spy)
    code, _, err = run(["distill", "guided", "--teacher", "m", *data, "--train-steps", "1", "--batch-size", "4",
                        "--out", "st", "--device", "cpu"], capsys)
    assert code == 0, err
    x, labels = seen[0]
    assert torch.equal(x, kept_model) and set(labels.tolist()) == {3, 5}
    assert difflab.load("st").distilled["kept_classes"] == [3, 5]
    code, _, err = run(["distill", "progressive", "--teacher", "st", "--from-steps", "2", "--to-steps", "1",
                        "--train-steps-per-round", "1", "--batch-size", "4", "--out", "st1", "--device", "cpu"], capsys)
    assert code == 0, err
    assert torch.equal(seen[1][0], kept_model)
    assert difflab.load("st1.rounds/steps-0001").distilled["kept_classes"] == [3, 5]


def test_a_toy_model_on_one_class_gets_that_many_samples_of_it(trained_on, monkeypatch, capsys):
    """moons drawn larger, then restricted, then cut: --pairs N gives N samples of the kept class."""
    import difflab.condition.deft as deft_module

    code, _, err = run([*TRAIN, "--data", "moons", "--keep-classes", "0"], capsys)
    assert code == 0, err
    real_fit, seen = deft_module.fit_deft, []

    def spy(base, operator, x0_data, **kwargs):
        seen.append(x0_data)
        return real_fit(base, operator, x0_data, **kwargs)

    monkeypatch.setattr(deft_module, "fit_deft", spy)
    code, _, err = run(["condition", "fit", "--model", "m", "--task", "inpaint", "--pairs", "1000", "--train-steps",
                        "1", "--batch-size", "4", "--out", "h", "--device", "cpu"], capsys)
    assert code == 0, err
    moons = make_moons(10_000, seed=0)   # what the command drew before keeping class 0 (--seed 0)
    moon_0 = {tuple(row) for row in moons.x[moons.labels == 0].tolist()}
    assert len(seen[0]) == 1000 and all(tuple(row) in moon_0 for row in seen[0].tolist())
