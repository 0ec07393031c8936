"""`difflab train --seed`: the seed fixes the network's initial weights as well as the batches, so two
runs with the same seed write byte-identical weights (and another seed different ones)."""
from __future__ import annotations

import pytest

from tests.apps.cli.helpers import run

pytestmark = pytest.mark.reliability("numerics")

TRAIN = ["train", "--data", "gmm", "--train-steps", "3", "--batch-size", "16", "--device", "cpu"]


def test_two_runs_with_the_same_seed_write_identical_weights(tmp_path, capsys):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        code, _, err = run([*TRAIN, "--seed", seed, "--out", tmp_path / name], capsys)
        assert code == 0, err
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in "abc"}
    assert weights["a"] == weights["b"]
    assert weights["a"] != weights["c"]
