"""`difflab condition fit | run` on a tiny untrained digits model: end to end, and every mistake
refused before any work with a specific error."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from difflab import EDMDenoiser
from difflab.apps.cli.condition import app
from difflab.core.errors import AddonMismatchError, ConfigError, ShapeError
from difflab.nets import UNet

runner = CliRunner()


def tiny_digits_model(path, seed=0):
    import torch

    torch.manual_seed(seed)
    net = UNet(base_channels=8, channel_mults=[1], attn_resolutions=[], groups=4, zero_init_output=False)
    EDMDenoiser(net, sigma_data=0.75, data_shape=(1, 8, 8), meta={"dataset": "digits", "num_classes": 0}).save(path)
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond")
    model = tiny_digits_model(root / "base")
    result = runner.invoke(app, ["fit", "--model", str(model), "--task", "inpaint", "--mask", "random",
                                 "--pairs", "32", "--train-steps", "2", "--batch-size", "8", "--out", str(root / "h"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return root, model, root / "h", json.loads(result.output.strip().splitlines()[-1])


def test_fit_writes_an_addon_that_names_its_base(fitted):
    root, model, hnet, summary = fitted
    config = json.loads((hnet / "config.json").read_text())
    assert config["class"] == "DEFTHNetwork" and config["operator"]["name"] == "inpaint"
    assert config["base_model"] and summary["hnet_fraction_of_base"] > 0


@pytest.mark.parametrize("method", ["deft", "dps", "pigdm", "uncond"])
def test_run_simulated_reconstructions(fitted, method):
    root, model, hnet, _ = fitted
    out = root / f"{method}.npz"
    args = ["run", "--model", str(model), "--method", method, "--simulate", "3", "--solver", "dpmpp_2m", "--nfe", "3",
            "--out", str(out), "--device", "cpu"]
    args += ["--hnet", str(hnet)] if method == "deft" else ["--task", "inpaint", "--mask", "random"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    arrays = np.load(out)
    assert arrays["x"].shape == (3, 1, 8, 8) and arrays["truth"].shape == (3, 1, 8, 8)
    assert np.isfinite(arrays["x"]).all() and "psnr" in json.loads(result.output)


def test_run_from_an_input_file_and_png(fitted):
    root, model, hnet, _ = fitted
    first = root / "first.npz"
    assert runner.invoke(app, ["run", "--model", str(model), "--method", "deft", "--hnet", str(hnet), "--simulate", "2",
                               "--nfe", "3", "--solver", "euler", "--out", str(first)]).exit_code == 0
    arrays = np.load(first)
    np.savez(root / "meas.npz", y=arrays["y"], mask=arrays["mask"])
    result = runner.invoke(app, ["run", "--model", str(model), "--method", "deft", "--hnet", str(hnet),
                                 "--input", str(root / "meas.npz"), "--nfe", "3", "--solver", "euler",
                                 "--out", str(root / "r.png")])
    assert result.exit_code == 0, result.output
    assert (root / "r.png").stat().st_size > 0


def test_run_refuses_mistakes_before_work(fitted, tmp_path):
    root, model, hnet, _ = fitted
    base = ["run", "--model", str(model), "--nfe", "3", "--device", "cpu"]
    cases = [
        (["--method", "deft", "--simulate", "2", "--out", str(tmp_path / "a.npz")], ConfigError),       # no --hnet
        (["--method", "dps", "--simulate", "2", "--out", str(tmp_path / "a.npz")], ConfigError),        # no --task
        (["--method", "dps", "--task", "blur", "--out", str(tmp_path / "a.npz")], ConfigError),         # no input
        (["--method", "dps", "--task", "blur", "--simulate", "2", "--out", str(tmp_path / "a.txt")], ConfigError),
        (["--method", "dps", "--task", "superres", "--factor", "3", "--simulate", "2",
          "--out", str(tmp_path / "a.npz")], ShapeError),                                                # 8 % 3
        (["--method", "dps", "--task", "blur", "--simulate", "2", "--solver", "nope",
          "--out", str(tmp_path / "a.npz")], Exception),
        (["--method", "pigdm", "--task", "phase", "--simulate", "2", "--out", str(tmp_path / "a.npz")], ConfigError),
    ]
    for extra, error in cases:
        result = runner.invoke(app, base + extra)
        assert result.exit_code != 0 and isinstance(result.exception, error), (extra, result.exception)
    assert not list(tmp_path.iterdir())   # nothing half-written
    (tmp_path / "exists.npz").write_bytes(b"x")
    result = runner.invoke(app, base + ["--method", "dps", "--task", "blur", "--simulate", "2",
                                        "--out", str(tmp_path / "exists.npz")])
    assert isinstance(result.exception, ConfigError) and "--force" in str(result.exception)


def test_an_hnetwork_for_another_model_is_refused(fitted, tmp_path):
    root, model, hnet, _ = fitted
    other = tiny_digits_model(tmp_path / "other", seed=1)
    result = runner.invoke(app, ["run", "--model", str(other), "--method", "deft", "--hnet", str(hnet), "--simulate",
                                 "2", "--nfe", "3", "--out", str(tmp_path / "x.npz")])
    assert isinstance(result.exception, AddonMismatchError)
    result = runner.invoke(app, ["run", "--model", str(model), "--method", "deft", "--hnet", str(hnet), "--task",
                                 "blur", "--simulate", "2", "--nfe", "3", "--out", str(tmp_path / "x.npz")])
    assert isinstance(result.exception, ConfigError)


def test_fit_refuses_bad_options(tmp_path):
    model = tiny_digits_model(tmp_path / "base")
    common = ["fit", "--model", str(model), "--train-steps", "1", "--out", str(tmp_path / "h")]
    for extra, error in [(["--task", "blur", "--kernel-size", "4"], ConfigError),
                         (["--task", "superres", "--factor", "3"], ShapeError),
                         (["--task", "inpaint", "--pairs", "100000"], ConfigError)]:
        result = runner.invoke(app, common + extra)
        assert isinstance(result.exception, error), (extra, result.exception)
    assert not (tmp_path / "h").exists()


def test_fit_with_a_cunet_h_network_runs_and_vectors_refuse_it(tmp_path):
    model = tiny_digits_model(tmp_path / "base")
    result = runner.invoke(app, ["fit", "--model", str(model), "--task", "superres", "--net", "cunet", "--pairs", "16",
                                 "--train-steps", "1", "--batch-size", "4", "--out", str(tmp_path / "h"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "h" / "config.json").read_text())["nn1"]["class"] == "CUNet"
    result = runner.invoke(app, ["run", "--model", str(model), "--method", "deft", "--hnet", str(tmp_path / "h"),
                                 "--simulate", "2", "--solver", "euler", "--nfe", "2", "--out", str(tmp_path / "x.npz"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    from difflab import GaussianMixture
    GaussianMixture([[0.0, 0.0], [1.0, 1.0]], stds=[[1.0, 1.0], [1.0, 1.0]]).save(tmp_path / "gmm")
    result = runner.invoke(app, ["fit", "--model", str(tmp_path / "gmm"), "--task", "inpaint", "--net", "cunet",
                                 "--data", "gmm", "--train-steps", "1", "--out",
                                 str(tmp_path / "h2")])
    assert isinstance(result.exception, ConfigError) and "image" in str(result.exception)
    assert not (tmp_path / "h2").exists()
