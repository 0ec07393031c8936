"""AMED on a learned grid ("grid, then AMED"): never worse than the learned grid alone on held-out noise of the
2-D test mixture, the predictor records the grid's σ's and fingerprint so sampling (library, CLI) uses them, and a
grid with the wrong number of levels or for another model is refused."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import difflab
from difflab.amed import AMEDConfig, GridConfig, amed_sample, fit_amed, grid_for_amed, predictor_sigmas
from difflab.amed.fit import NotImprovedWarning, refine_grid
from difflab.amed.grids import LearnedGrid
from difflab.amed.plugin import amed_plugin
from difflab.core.errors import AddonMismatchError, ConfigError
from difflab.core.fingerprint import fingerprint

CONFIG = AMEDConfig(nfe=5, M=7, trajectories=512, batch_size=64, heldout=128, base_solver="ipndm")


@pytest.fixture(scope="module")
def mixture():
    return difflab.GaussianMixture([[-4.0, 0.0], [3.0, 3.0], [2.0, -4.0]], stds=[[0.5, 1.0], [0.8, 0.4], [0.6, 0.7]],
                                   weights=[0.5, 0.3, 0.2])


@pytest.fixture(scope="module")
def grid_then_amed(mixture):
    grid = grid_for_amed(mixture, CONFIG, "ld3", GridConfig(fine_levels=60, n_fit=48, n_eval=128,
                                                            train_steps=200)).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotImprovedWarning)      # "no better than the grid alone" is legitimate here
        result = fit_amed(mixture, CONFIG, shape=(2,), grid=grid)
    return grid, result


def test_grid_for_amed_fits_the_plugins_unfitted_solver_at_the_amed_budget(grid_then_amed):
    grid, _ = grid_then_amed
    assert (grid.solver, grid.nfe, grid.refine, len(grid.sigmas)) == ("ipndm", 5, True, 4)   # AFS: 4 levels for NFE 5
    assert grid.metrics["learned_error"] < grid.metrics["base_error"]


def test_amed_on_a_learned_grid_is_never_worse_than_the_grid_alone_on_held_out_noise(grid_then_amed, mixture):
    """The held-out base of the fit is the learned grid with an unfitted predictor (= ipndm on the grid's levels and
    log-midpoints), re-measured here from fresh noise against the exact-model teacher."""
    grid, result = grid_then_amed
    assert result.metrics["heldout_error_fitted"] <= result.metrics["heldout_error_base"]
    x = 80.0 * torch.randn(256, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    teacher = difflab.sample(mixture, x, refine_grid(grid.sigmas, 64), solver="heun")
    with torch.no_grad():
        fitted = amed_sample(mixture, x, predictor_sigmas(result.model), result.model)
    grid_alone = difflab.sample(mixture, x, grid.check(mixture), solver="ipndm", afs=True)
    error = lambda out: float((out - teacher).norm(dim=1).mean())  # noqa: E731
    # the fit keeps its best held-out state (or the base): on 256 fresh draws it may tie, within sampling noise (5%)
    assert error(fitted) <= 1.05 * error(grid_alone), (error(fitted), error(grid_alone))


def test_the_predictor_records_the_grid_and_sampling_uses_it(grid_then_amed, mixture, tmp_path):
    grid, result = grid_then_amed
    predictor = result.model
    assert predictor.fitted_for["grid"] == "learned" and predictor.fitted_for["grid_model"] == fingerprint(grid)
    torch.testing.assert_close(predictor_sigmas(predictor), grid.sigmas, rtol=0, atol=0)
    predictor.save(tmp_path / "predictor")
    loaded = difflab.load(tmp_path / "predictor")
    torch.testing.assert_close(predictor_sigmas(loaded), grid.sigmas, rtol=0, atol=0)
    x = 80.0 * torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    karras = difflab.get_sigmas("karras", 4, 0.002, 80.0)
    with pytest.raises(AddonMismatchError, match="learned grid"):
        amed_plugin(mixture, x, karras, loaded, base="ipndm")


def test_a_grid_with_other_levels_or_for_another_model_is_refused(mixture):
    wrong = LearnedGrid(difflab.get_sigmas("karras", 6, 0.002, 80.0), "ipndm", 5, "ld3", fingerprint(mixture))
    with pytest.raises(ConfigError, match="4 levels"):
        fit_amed(mixture, CONFIG, shape=(2,), grid=wrong)
    other = LearnedGrid(difflab.get_sigmas("karras", 4, 0.002, 80.0), "ipndm", 5, "ld3",
                        fingerprint(difflab.GaussianMixture([[0.0, 0.0]], stds=[1.0])))
    with pytest.raises(AddonMismatchError):
        fit_amed(mixture, CONFIG, shape=(2,), grid=other)


def test_cli_amed_fit_on_a_grid_file_then_sample(grid_then_amed, mixture, tmp_path):
    from typer.testing import CliRunner

    from difflab.apps.cli.app import app

    grid, _ = grid_then_amed
    mixture.save(tmp_path / "model")
    grid.save(tmp_path / "grid")
    fit = CliRunner().invoke(app, ["amed", "fit", "--model", str(tmp_path / "model"), "--nfe", "5", "--base-solver",
                                   "ipndm", "--M", "7", "--trajectories", "256", "--batch-size", "64", "--grid-file",
                                   str(tmp_path / "grid"), "--out", str(tmp_path / "amed"), "--device", "cpu",
                                   "--save-if-worse"])
    assert fit.exit_code == 0, fit.output
    assert json.loads(fit.output.strip().splitlines()[-1])["grid"] == str(tmp_path / "grid")
    run = CliRunner().invoke(app, ["sample", "--model", str(tmp_path / "model"), "--solver", "amed", "--predictor",
                                   str(tmp_path / "amed"), "--n", "8", "--out", str(tmp_path / "x.npz"),
                                   "--device", "cpu"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.output.strip().splitlines()[-1])["points"] == 4
