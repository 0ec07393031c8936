"""Learned grids (GITS, LD3) on the analytic 2-D mixture: the dynamic programme against brute force, the
differentiable student against the registered solvers, the grid's shape and budget, the held-out margin
over Karras ρ = 7, "never worse" (Karras returned when not better), save / load, the refusal for another base
model and `difflab amed grid`."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import difflab
from difflab.amed import GridConfig, LearnedGrid, fit_grid
from difflab.amed.grids import (
    LD3_SOLVERS,
    load_grid,
    logits_to_sigmas,
    shortest_path_with_jumps,
    sigmas_to_logits,
    student_solve,
)
from difflab.core.errors import AddonMismatchError, ConfigError, NotImprovedWarning
from difflab.sampling import SOLVERS, get_sigmas
from tests.sampling.helpers import CountingDenoiser

CONFIG = GridConfig(fine_levels=60, n_fit=48, n_eval=128, train_steps=200)


@pytest.fixture(scope="module")
def mixture():
    return difflab.GaussianMixture([[-4.0, 0.0], [3.0, 3.0], [2.0, -4.0]], stds=[[0.5, 1.0], [0.8, 0.4], [0.6, 0.7]],
                                   weights=[0.5, 0.3, 0.2])


@pytest.fixture(scope="module")
def fits(mixture):
    """(method, solver, nfe) -> FitResult, fitted once for the module."""
    cases = [("gits", "euler", 5), ("gits", "dpmpp_2m", 4), ("ld3", "euler", 5), ("ld3", "ipndm", 5)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                           # none of these may warn "not better"
        return {case: fit_grid(mixture, case[1], case[2], case[0], CONFIG) for case in cases}


def test_dynamic_programme_finds_the_cheapest_path_with_exactly_k_jumps():
    generator = torch.Generator().manual_seed(0)
    n = 8
    cost = torch.rand((n, n), generator=generator, dtype=torch.float64)
    for jumps in range(1, n):
        path = shortest_path_with_jumps(cost, jumps)
        best = min(itertools.combinations(range(1, n - 1), jumps - 1),
                   key=lambda inner: sum(cost[a, b] for a, b in zip((0, *inner), (*inner, n - 1))))
        total = lambda p: float(sum(cost[a, b] for a, b in zip(p[:-1], p[1:])))  # noqa: E731
        assert path[0] == 0 and path[-1] == n - 1 and len(path) == jumps + 1
        assert total(path) == pytest.approx(total((0, *best, n - 1)), abs=1e-12)


def test_ld3_parameterisation_is_decreasing_with_exact_ends_and_inverts_karras():
    logits = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    sigmas = logits_to_sigmas(logits, 0.002, 80.0)
    assert sigmas[0] == 80.0 and sigmas[-1] == 0.002 and bool((sigmas.diff() < 0).all())
    karras = difflab.get_sigmas("karras", 7, 0.002, 80.0)
    torch.testing.assert_close(logits_to_sigmas(sigmas_to_logits(karras), 0.002, 80.0), karras, rtol=1e-12, atol=0)


@pytest.mark.parametrize("solver", LD3_SOLVERS)
@pytest.mark.parametrize("afs", [False, True])
def test_differentiable_student_is_the_registered_solver(mixture, solver, afs):
    x = 80 * torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grid = difflab.get_sigmas("karras", 6, 0.002, 80.0)
    # the same step functions in another order of float operations: round-off only
    expected = SOLVERS[solver].fn(mixture, x, grid, afs=afs)
    torch.testing.assert_close(student_solve(mixture, x, grid, solver, afs), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", [("gits", "euler", 5), ("gits", "dpmpp_2m", 4), ("ld3", "euler", 5),
                                  ("ld3", "ipndm", 5)], ids=lambda c: "-".join(map(str, c)))
def test_learned_grid_spends_exactly_nfe_between_sigma_max_and_sigma_min(fits, mixture, case):
    grid = fits[case].model
    assert grid.sigmas[0] == 80.0 and grid.sigmas[-1] == pytest.approx(0.002, rel=1e-12)
    assert bool((grid.sigmas.diff() < 0).all())
    counting = CountingDenoiser(mixture)
    difflab.sample(counting, 80 * torch.randn(4, 2, dtype=torch.float64), grid.check(mixture), solver=grid.solver)
    assert counting.calls == case[2] == grid.nfe


# Held-out mean endpoint errors (CONFIG: seeds 0 / 1, 128 held-out draws, 60 fine levels, 200 LD3 steps),
# Karras ρ = 7 → learned: GITS euler NFE 5: 0.862 → 0.783; GITS dpmpp_2m NFE 4: 1.085 → 0.767;
# LD3 euler NFE 5: 0.862 → 0.452; LD3 ipndm NFE 5: 0.882 → 0.148. Each bound sits between the measured
# ratio (0.91, 0.71, 0.52, 0.17) and 1, so a grid that merely ties Karras fails.
@pytest.mark.parametrize("case, at_most", [(("gits", "euler", 5), 0.95), (("gits", "dpmpp_2m", 4), 0.8),
                                           (("ld3", "euler", 5), 0.7), (("ld3", "ipndm", 5), 0.4)],
                         ids=["gits-euler", "gits-dpmpp_2m", "ld3-euler", "ld3-ipndm"])
def test_learned_grid_beats_karras_on_held_out_noise_by_a_margin(fits, case, at_most):
    metrics = fits[case].model.metrics
    assert metrics["learned_error"] < at_most * metrics["base_error"], metrics


def test_fit_result_follows_the_fit_contract(fits):
    gits, ld3 = fits[("gits", "euler", 5)], fits[("ld3", "euler", 5)]
    assert gits.history == [] and {"teacher", "fit", "eval", "total"} <= set(gits.timings)
    assert ld3.history[-1][0] == CONFIG.train_steps and ld3.history[-1][1] < ld3.history[0][1]
    assert GridConfig.from_json(CONFIG.to_json()) == CONFIG


def test_a_grid_that_is_not_better_is_reported_and_karras_returned(mixture):
    """Never worse. GITS's one-step cost is the warm-up (Euler) step for a multistep solver: for iPNDM-v it picks a
    worse grid, and the fit returns Karras' grid instead, flagged, with both held-out errors."""
    with pytest.warns(NotImprovedWarning, match="not better"):
        result = fit_grid(mixture, "ipndm_v", 5, "gits", GridConfig(fine_levels=40, n_fit=16, n_eval=64))
    grid, karras = result.model, get_sigmas("karras", 6, 0.002, 80.0)
    assert result.model.metrics["learned_error"] > 1.2 * result.model.metrics["base_error"]   # clearly worse
    assert not grid.improved and grid.method == "gits"
    torch.testing.assert_close(grid.sigmas, karras, rtol=0, atol=0)


def test_a_fit_that_cannot_improve_returns_its_base_exactly(mixture):
    """LD3 with a step size so large that the first Adam step throws the grid far off (softmax near one-hot)."""
    config = GridConfig(fine_levels=20, n_fit=8, n_eval=32, train_steps=2, lr=100.0, log_every=1)
    with pytest.warns(NotImprovedWarning):
        result = fit_grid(mixture, "euler", 4, "ld3", config)
    assert result.model.metrics["learned_error"] > 2 * result.model.metrics["base_error"]
    torch.testing.assert_close(result.model.sigmas, get_sigmas("karras", 5, 0.002, 80.0), rtol=0, atol=0)


def test_save_load_round_trip_and_refusal_for_another_base_model(fits, mixture, tmp_path):
    grid = fits[("ld3", "euler", 5)].model
    grid.save(tmp_path / "grid")
    loaded = load_grid(tmp_path / "grid", base_model=mixture)
    assert isinstance(difflab.load(tmp_path / "grid"), LearnedGrid)
    torch.testing.assert_close(loaded.sigmas, grid.sigmas, rtol=0, atol=0)
    fields = lambda g: (g.solver, g.nfe, g.method, g.afs, g.base_model, g.metrics, g.improved)  # noqa: E731
    assert fields(loaded) == fields(grid)
    other = difflab.GaussianMixture([[0.0, 0.0]], stds=[1.0])
    with pytest.raises(AddonMismatchError, match="learned grid"):
        load_grid(tmp_path / "grid", base_model=other)
    with pytest.raises(AddonMismatchError):
        grid.check(other)


@pytest.mark.parametrize("solver, nfe, method", [("euler_maruyama", 5, "gits"), ("deis", 5, "ld3"),
                                                 ("euler", 5, "optimal"), ("heun", 5, "gits")])
def test_bad_requests_raise_config_error_before_any_call(mixture, solver, nfe, method):
    counting = CountingDenoiser(mixture)
    with pytest.raises(ConfigError):
        fit_grid(counting, solver, nfe, method, CONFIG)
    assert counting.calls == 0


def test_cli_samples_on_a_grid_file_and_refuses_another_nfe(fits, mixture, tmp_path):
    """`difflab sample --grid-file` (here rather than in tests/apps/cli: it needs this module's fitted grid)."""
    import json

    from typer.testing import CliRunner

    from difflab.apps.cli.app import app

    mixture.save(tmp_path / "model")
    fits[("ld3", "ipndm", 5)].model.save(tmp_path / "grid")
    args = ["sample", "--model", str(tmp_path / "model"), "--grid-file", str(tmp_path / "grid"), "--n", "8",
            "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x.npz")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1]) | {"out": None} == {
        "out": None, "n": 8, "solver": "ipndm", "nfe": 5, "points": 6, "processes": 1}
    refused = CliRunner().invoke(app, [*args, "--nfe", "6", "--out", str(tmp_path / "y.npz")])
    assert isinstance(refused.exception, ConfigError) and "fitted for NFE 5" in str(refused.exception)


def test_cli_fits_a_grid_that_samples_and_refuses_to_save_one_no_better_than_karras(mixture, tmp_path):
    """`difflab amed grid`: an LD3 grid is saved; the GITS grid for iPNDM-v that is worse
    than Karras (above) is refused with exit status 2 and nothing written, unless --save-if-worse."""
    import json

    from typer.testing import CliRunner

    from difflab.apps.cli.app import app

    mixture.save(tmp_path / "model")
    common = ["amed", "grid", "--model", str(tmp_path / "model"), "--device", "cpu"]
    fitted = CliRunner().invoke(app, [*common, "--solver", "euler", "--nfe", "5", "--grid-method", "ld3",
                                      "--fine-levels", "60", "--n-fit", "48", "--n-eval", "128", "--out",
                                      str(tmp_path / "ld3")])
    assert fitted.exit_code == 0, fitted.output
    report = json.loads(fitted.output.strip().splitlines()[-1])
    assert report["improved"] and report["heldout_error_learned"] < 0.8 * report["heldout_error_karras"]
    torch.testing.assert_close(load_grid(tmp_path / "ld3", base_model=mixture).sigmas,   # the echo: 6 decimals
                               torch.tensor(report["sigmas"], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    worse = [*common, "--solver", "ipndm_v", "--nfe", "5", "--grid-method", "gits", "--fine-levels", "40",
             "--n-fit", "16", "--n-eval", "64"]
    refused = CliRunner().invoke(app, [*worse, "--out", str(tmp_path / "gits")])
    assert refused.exit_code == 2 and "no better than Karras" in refused.output
    assert not (tmp_path / "gits").exists()
    saved = CliRunner().invoke(app, [*worse, "--save-if-worse", "--out", str(tmp_path / "gits")])
    assert saved.exit_code == 0, saved.output
    torch.testing.assert_close(load_grid(tmp_path / "gits").sigmas, get_sigmas("karras", 6, 0.002, 80.0), rtol=0,
                               atol=0)
    bad = CliRunner().invoke(app, [*common, "--solver", "euler_maruyama", "--out", str(tmp_path / "x")])
    assert isinstance(bad.exception, ConfigError) and "deterministic" in str(bad.exception)   # exit 2 in `main`
    assert not (tmp_path / "x").exists()
