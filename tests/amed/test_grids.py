"""Learned grids (GITS, LD3) on the analytic 2-D mixture: the dynamic programme against brute force, the
differentiable student against the registered solvers, the grid's shape and budget, the held-out margin
over Karras ρ = 7, the "not better" warning, save / load and the refusal for another base model."""
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
from difflab.core.errors import AddonMismatchError, ConfigError
from difflab.sampling import SOLVERS
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


def test_a_grid_that_is_not_better_is_reported_with_a_warning(mixture):
    """GITS's one-step cost is the warm-up (Euler) step for a multistep solver: for iPNDM-v it picks a worse grid."""
    with pytest.warns(UserWarning, match="not better"):
        result = fit_grid(mixture, "ipndm_v", 5, "gits", GridConfig(fine_levels=40, n_fit=16, n_eval=64))
    assert result.model.metrics["learned_error"] >= result.model.metrics["base_error"]


def test_save_load_round_trip_and_refusal_for_another_base_model(fits, mixture, tmp_path):
    grid = fits[("ld3", "euler", 5)].model
    grid.save(tmp_path / "grid")
    loaded = load_grid(tmp_path / "grid", base_model=mixture)
    assert isinstance(difflab.load(tmp_path / "grid"), LearnedGrid)
    torch.testing.assert_close(loaded.sigmas, grid.sigmas, rtol=0, atol=0)
    fields = lambda g: (g.solver, g.nfe, g.method, g.afs, g.base_model, g.metrics)  # noqa: E731
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
