"""`difflab train --keep-classes`: only the samples of the listed classes reach the training loop, the
model folder records the classes, and a data set without labels or without one of the classes is
refused with one line before any output (model folder or checkpoints) is made."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import difflab
import difflab.train.denoiser as denoiser_module
from difflab.data import load_digits
from tests.cli.helpers import run

TRAIN = ["train", "--channels", "8", "--steps", "1", "--batch-size", "4", "--device", "cpu", "--out", "m"]


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
    flags = ["--classes"] if conditional else []
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
    code, out, _ = run(["info", "m"], capsys)
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


def test_commands_that_read_the_model_s_data_keep_to_its_classes(trained_on, monkeypatch, capsys):
    """sample / compose refuse a class the model never saw; condition fit, condition run --simulate and
    distill guided draw only the kept classes' samples, and the student records them."""
    code, _, err = run([*TRAIN, "--data", "digits", "--classes", "--keep-classes", "3", "5"], capsys)
    assert code == 0, err
    for argv in (["sample", "--model", "m", "--class", "7", "--nfe", "2", "--solver", "euler", "--n", "2",
                  "--out", "s.npz"],
                 ["compose", "--model", "m", "--classes", "3", "7", "--nfe", "2", "--n", "2", "--out", "c.npz"]):
        code, out, err = run(argv, capsys)
        assert code == 2 and "7" in err and "[3, 5]" in err, err
    code, _, err = run(["sample", "--model", "m", "--class", "5", "--nfe", "2", "--solver", "euler", "--n", "2",
                        "--out", "s.npz"], capsys)
    assert code == 0, err

    import difflab.condition.deft as deft_module
    import difflab.distill as distill_module
    digits, seen = load_digits("train"), {}
    wanted = digits.x[(digits.labels == 3) | (digits.labels == 5)]
    real_fit, real_batches = deft_module.fit_deft, distill_module.dataset_batches
    monkeypatch.setattr(deft_module, "fit_deft", lambda base, op, x0, **kw: seen.setdefault("deft", x0) is None
                        or real_fit(base, op, x0, **kw))
    monkeypatch.setattr(distill_module, "dataset_batches",
                        lambda x, labels=None: seen.setdefault("distill", (x, labels)) and real_batches(x, labels))
    code, _, err = run(["condition", "fit", "--model", "m", "--task", "superres", "--pairs", "100", "--steps", "1",
                        "--batch-size", "4", "--out", "h", "--device", "cpu"], capsys)
    assert code == 0, err
    assert torch.equal(seen["deft"], wanted[:100])
    code, _, err = run(["distill", "guided", "--teacher", "m", "--steps", "1", "--batch-size", "4", "--out", "st",
                        "--device", "cpu"], capsys)
    assert code == 0, err
    x, labels = seen["distill"]
    assert torch.equal(x, wanted) and set(labels.tolist()) == {3, 5}
    assert difflab.load("st").distilled["kept_classes"] == [3, 5]
    code, out, err = run(["condition", "run", "--model", "m", "--method", "dps", "--task", "superres", "--simulate",
                          "3", "--solver", "euler", "--nfe", "2", "--out", "r.npz", "--device", "cpu"], capsys)
    assert code == 0, err
    test = load_digits("test")
    assert np.array_equal(np.load("r.npz")["truth"], test.x[(test.labels == 3) | (test.labels == 5)][:3].numpy())
