"""`difflab compose` (the sub-app in difflab.apps.cli.compose), on exact mixtures saved as model folders."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from difflab import GaussianMixture
from difflab.apps.cli.common import expand_greedy
from difflab.apps.cli.compose import GREEDY_OPTIONS, app
from difflab.core.errors import ConfigError

runner = CliRunner()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose-cli")
    GaussianMixture([[-4.0, 0.0], [3.0, 3.0]], stds=[0.5, 0.8]).save(root / "a")
    GaussianMixture([[2.0, -4.0], [-3.0, 4.0]], stds=[0.6, 0.7]).save(root / "b")
    GaussianMixture([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], stds=[0.6, 0.7, 0.5],
                    labels=[0, 1, 2]).save(root / "labelled")
    GaussianMixture([[-1.0] * 4, [1.0] * 4], stds=[0.3, 0.3], data_shape=(1, 2, 2)).save(root / "img_a")
    GaussianMixture([[1.0, -1.0, 1.0, -1.0], [0.0] * 4], stds=[0.3, 0.3], data_shape=(1, 2, 2)).save(root / "img_b")
    return root


def invoke(args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def test_greedy_flags_take_several_values():
    assert expand_greedy(["--models", "a", "b", "--bias", "-1", "0.5", "--n", "3"], GREEDY_OPTIONS) == [
        "--models", "a", "--models", "b", "--bias", "-1", "--bias", "0.5", "--n", "3"]


def test_or_over_two_models_writes_x_and_log_q(folders, tmp_path):
    out = tmp_path / "or.npz"
    result = invoke(["--models", folders / "a", folders / "b", "--mode", "or", "--nfe", "20", "--n", "12",
                     "--bias", "0", "0.5", "--out", out, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    saved = np.load(out)
    assert saved["x"].shape == (12, 2) and saved["log_q"].shape == (12, 2) and np.isfinite(saved["log_q"]).all()
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["models"] == 2 and summary["model_calls"] == 40


def test_and_over_classes_with_guidance_batch_size_independent(folders, tmp_path):
    outputs = []
    for batch in (10, 4):
        out = tmp_path / f"and{batch}.npz"
        result = invoke(["--model", folders / "labelled", "--classes", "0", "2", "--w", "1.0", "--mode", "and",
                         "--noise-correction", "--nfe", "15", "--n", "10", "--seed", "3", "--batch-size", batch,
                         "--out", out])
        assert result.exit_code == 0, result.output
        outputs.append(np.load(out))
    np.testing.assert_allclose(outputs[0]["log_q"][:, 0], outputs[0]["log_q"][:, 1], atol=1e-5)
    np.testing.assert_allclose(outputs[0]["x"], outputs[1]["x"], atol=1e-5)   # per-sample seeding


def test_ode_and_png_grid(folders, tmp_path):
    out = tmp_path / "grid.png"
    result = invoke(["--models", folders / "img_a", folders / "img_b", "--ode", "--nfe", "5", "--n", "4",
                     "--out", out])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--models", "{a}", "--out", "{out}"], "at least two"),
    (["--models", "{a}", "{b}", "--model", "{a}", "--out", "{out}"], "either --models"),
    (["--model", "{lab}", "--classes", "0", "7", "--out", "{out}"], "not among the classes"),
    (["--model", "{a}", "--classes", "0", "1", "--out", "{out}"], "not class-conditional"),
    (["--models", "{a}", "{b}", "--bias", "1", "--out", "{out}"], "one number per model"),
    (["--models", "{a}", "{b}", "--w", "2", "--out", "{out}"], "go with --model"),
    (["--models", "{a}", "{b}", "--out", "{png}"], "image data"),
    (["--models", "{a}", "{b}", "--nfe", "0", "--out", "{out}"], "--nfe"),
    (["--models", "{a}", "{tmp}/missing", "--out", "{out}"], "does not exist"),
    (["--models", "{a}", "{img}", "--out", "{out}"], "common data shape"),
    (["--models", "{a}", "{b}", "--noise-correction", "--out", "{out}"], "--noise-correction"),
])
def test_mistakes_are_specific_errors_and_leave_no_file(folders, tmp_path, args, message):
    paths = {"a": folders / "a", "b": folders / "b", "lab": folders / "labelled", "img": folders / "img_a",
             "out": tmp_path / "x.npz", "png": tmp_path / "x.png", "tmp": tmp_path}
    result = invoke([a.format(**paths) for a in args])
    assert isinstance(result.exception, ConfigError) and message in str(result.exception)
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "x.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_existing_output_needs_force(folders, tmp_path):
    out = tmp_path / "taken.npz"
    out.write_bytes(b"keep")
    result = invoke(["--models", folders / "a", folders / "b", "--nfe", "3", "--n", "2", "--out", out])
    assert isinstance(result.exception, ConfigError) and "--force" in str(result.exception)
    assert out.read_bytes() == b"keep"
    result = invoke(["--models", folders / "a", folders / "b", "--nfe", "3", "--n", "2", "--out", out, "--force"])
    assert result.exit_code == 0 and np.load(out)["x"].shape == (2, 2)
