"""The `difflab` command: the happy path end to end, and one-line errors with exit status 2."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from difflab.apps.cli.app import main
from tests.apps.cli.helpers import run


@pytest.fixture(scope="module")
def gmm_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "gmm"
    sys.argv, old = ["difflab", "train", "--data", "gmm", "--train-steps", "40", "--batch-size", "64",
                     "--out", str(folder), "--device", "cpu"], sys.argv
    try:
        main()
    finally:
        sys.argv = old
    return folder


def test_help_lists_the_commands(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and all(cmd in out for cmd in ("train", "sample", "info", "demo"))


def test_train_then_info_then_sample_npz(gmm_model, tmp_path, capsys):
    code, out, _ = run(["info", "--model", gmm_model], capsys)
    assert code == 0 and json.loads(out)["network"]["class"] == "MLP" and json.loads(out)["parameters"] > 0
    code, out, err = run(["sample", "--model", gmm_model, "--solver", "euler", "--nfe", "6", "--n", "10",
                          "--out", tmp_path / "s.npz", "--device", "cpu"], capsys)
    assert code == 0, err
    assert np.load(tmp_path / "s.npz")["x"].shape == (10, 2)
    assert json.loads(out)["nfe"] == 6


def test_same_seed_same_samples_whatever_the_batch_size(gmm_model, tmp_path, capsys):
    for name, batch in (("a.npz", 10), ("b.npz", 3)):
        code, _, err = run(["sample", "--model", gmm_model, "--solver", "heun", "--nfe", "7", "--n", "10",
                            "--seed", "5", "--batch-size", batch, "--out", tmp_path / name], capsys)
        assert code == 0, err
    # the noise is bit-identical (tests/sampling); the network's float32 matmuls may round differently
    # with the batch size (BLAS blocking), so compare to float32 round-off, far below sample spread
    np.testing.assert_allclose(np.load(tmp_path / "a.npz")["x"], np.load(tmp_path / "b.npz")["x"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("args, keyword", [
    (["--solver", "rk45"], "unknown solver"),
    (["--solver", "heun", "--nfe", "36"], "cannot spend exactly 36"),
    (["--out-suffix", ".txt"], "must end in"),
    (["--out-suffix", ".png"], "image data"),
    (["--missing-model"], "no model folder"),
])
def test_bad_sample_arguments_end_in_one_line_and_status_2(gmm_model, tmp_path, capsys, args, keyword):
    out_file = tmp_path / ("s" + (args[1] if args[0] == "--out-suffix" else ".npz"))
    model = tmp_path / "nowhere" if args == ["--missing-model"] else gmm_model
    extra = [] if args[0] in ("--out-suffix", "--missing-model") else args
    code, _, err = run(["sample", "--model", model, "--out", out_file, *extra], capsys)
    assert code == 2
    assert err.count("\n") == 1 and keyword in err and "Traceback" not in err
    assert not out_file.exists()                                    # no partial output


def test_existing_output_needs_force(gmm_model, tmp_path, capsys):
    target = tmp_path / "s.npz"
    target.write_bytes(b"keep me")
    code, _, err = run(["sample", "--model", gmm_model, "--nfe", "5", "--solver", "euler", "--out", target], capsys)
    assert code == 2 and "--force" in err and target.read_bytes() == b"keep me"


def test_unknown_dataset_and_missing_option_are_one_line_errors(tmp_path, capsys):
    code, _, err = run(["train", "--data", "cifar11", "--out", tmp_path / "m"], capsys)
    assert code == 2 and "cifar11" in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()
    code, _, err = run(["sample", "--out", tmp_path / "x.npz"], capsys)
    assert code == 2 and "--model" in err


def test_train_digits_unet_and_sample_a_png_grid(tmp_path, capsys):
    code, _, err = run(["train", "--data", "digits", "--train-steps", "3", "--batch-size", "16", "--channels", "8",
                        "--conditional", "--out", tmp_path / "d", "--device", "cpu"], capsys)
    assert code == 0, err
    code, out, err = run(["sample", "--model", tmp_path / "d", "--solver", "euler", "--nfe", "3", "--n", "4",
                          "--class", "7", "--out", tmp_path / "g.png"], capsys)
    assert code == 0, err
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_registered_solver_runs_from_the_cli_at_an_exact_budget(gmm_model, tmp_path, capsys):
    from difflab.sampling import SOLVERS

    for name in SOLVERS:
        code, out, err = run(["sample", "--model", gmm_model, "--solver", name, "--nfe", "8", "--afs", "--n", "4",
                              "--out", tmp_path / f"{name}.npz"], capsys)
        assert code == 0, (name, err)
        assert json.loads(out)["nfe"] == 8 and np.isfinite(np.load(tmp_path / f"{name}.npz")["x"]).all()


def test_amed_fit_refuses_a_plugin_no_better_than_its_plain_base_at_the_same_nfe(tmp_path, capsys):
    """AMED-Plugin on iPNDM at NFE 7 (AFS, 3 steps of 2 evaluations) loses to plain iPNDM + AFS on the exact 2-D
    mixture (0.095 vs 0.036): refused with one line naming the plain solver, nothing written; --save-if-worse
    saves it with both errors."""
    from difflab.data.toy import default_gmm

    default_gmm().save(tmp_path / "mixture")
    args = ["amed", "fit", "--model", tmp_path / "mixture", "--nfe", "7", "--base-solver", "ipndm", "--M", "3",
            "--trajectories", "64", "--batch-size", "32", "--device", "cpu"]
    code, _, err = run([*args, "--out", tmp_path / "p"], capsys)
    assert code == 2 and "no better than plain ipndm" in err and "--solver ipndm --nfe 7" in err
    assert not (tmp_path / "p").exists()
    code, out, err = run([*args, "--out", tmp_path / "q", "--save-if-worse"], capsys)
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["heldout_error_plain"] < report["heldout_error_fitted"] and (tmp_path / "q").is_dir()


def test_amed_fit_then_sample_and_refusal_for_another_nfe(gmm_model, tmp_path, capsys):
    code, out, err = run(["amed", "fit", "--model", gmm_model, "--nfe", "5", "--trajectories", "64",
                          "--batch-size", "32", "--out", tmp_path / "amed", "--device", "cpu"], capsys)
    assert code == 0, err
    assert 8_000 < json.loads(out.strip().splitlines()[-1])["parameters"] < 10_000
    code, out, err = run(["sample", "--model", gmm_model, "--solver", "amed", "--predictor", tmp_path / "amed",
                          "--n", "6", "--out", tmp_path / "a.npz"], capsys)
    assert code == 0, err
    assert json.loads(out)["nfe"] == 5 and np.load(tmp_path / "a.npz")["x"].shape == (6, 2)
    code, _, err = run(["sample", "--model", gmm_model, "--solver", "amed", "--predictor", tmp_path / "amed",
                        "--nfe", "7", "--out", tmp_path / "b.npz"], capsys)
    assert code == 2 and "NFE 5" in err and not (tmp_path / "b.npz").exists()
    code, _, err = run(["sample", "--model", gmm_model, "--solver", "amed", "--out", tmp_path / "c.npz"], capsys)
    assert code == 2 and "--predictor" in err


def test_train_passes_its_rollback_budget_on_and_reports_rollbacks_and_divergence(tmp_path, capsys):
    code, out, err = run(["train", "--data", "gmm", "--train-steps", "3", "--batch-size", "16", "--device", "cpu",
                          "--divergence-rollbacks", "2", "--out", tmp_path / "m"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["rollbacks"] == [] and report["divergence"] is None   # 3 steps, one log point: nothing to compare
    assert json.loads((tmp_path / "m" / "config.json").read_text())["fit"]["divergence_rollbacks"] == 2
    code, _, err = run(["train", "--data", "gmm", "--divergence-rollbacks", "-1", "--out", tmp_path / "n"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "n").exists()
