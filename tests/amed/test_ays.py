"""Align Your Steps: the KLUB estimate against its closed form on a single Gaussian, the coordinate refinement
against the known optimum of a toy objective, and a fitted grid that beats its starting Karras grid on held-out
noise of the 2-D test mixture (exact model, teacher endpoints as in tests/amed/test_grids.py)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from scipy.integrate import quad

import difflab
from difflab.amed import GridConfig, fit_grid
from difflab.amed.ays import klub_noise, klub_terms, refine_schedule

MU, STD, DIM, SIGMA_LOW = 1.5, 0.7, 2, 0.002


def klub_closed_form(sigma_hi: float, sigma_lo: float) -> float:
    """(A3) for data N(μ, s²I) in d dims: D(x; t) = μ + a_t (x − μ), a_t = s²/(s² + t²), so with y_t = x_t − μ,
    ΔD = (a_t − a_hi)·y_t − a_hi·sqrt(σ_hi² − t²)·ε₂ and E‖ΔD‖² = d[(a_t − a_hi)²(s² + t²) + a_hi²(σ_hi² − t²)]."""
    a = lambda t: STD**2 / (STD**2 + t**2)  # noqa: E731
    integrand = lambda t: DIM * ((a(t) - a(sigma_hi)) ** 2 * (STD**2 + t**2)  # noqa: E731
                                 + a(sigma_hi) ** 2 * (sigma_hi**2 - t**2)) / t**3
    return quad(integrand, sigma_lo, sigma_hi, limit=200, epsrel=1e-10)[0]


def test_klub_estimate_matches_the_closed_form_on_a_single_gaussian():
    gaussian = difflab.GaussianMixture([[MU] * DIM], stds=[STD])
    generator = torch.Generator().manual_seed(0)
    # exact samples of the marginal at σ_low: N(μ, (s² + σ_low²) I)
    x_low = MU + math.sqrt(STD**2 + SIGMA_LOW**2) * torch.randn(20_000, DIM, generator=generator, dtype=torch.float64)
    sigmas = torch.tensor([80.0, 5.0, 0.5, 0.05, SIGMA_LOW], dtype=torch.float64)
    estimate = klub_terms(gaussian, sigmas, x_low, SIGMA_LOW, klub_noise(x_low, 16, generator))
    exact = torch.tensor([klub_closed_form(hi, lo) for hi, lo in zip(sigmas[:-1].tolist(), sigmas[1:].tolist())],
                         dtype=torch.float64)
    # 20,000 paths per node: a relative standard error of about 1% per term (measured over seeds: 0.3–1.2%);
    # 16 Gauss–Legendre nodes in log t leave < 0.1%. A wrong weight (1/t² or 1/t⁴) or a path with the wrong
    # variance is off by factors, far outside 5%.
    torch.testing.assert_close(estimate, exact, rtol=0.05, atol=0)


def test_coordinate_refinement_finds_the_optimum_of_a_convex_toy_klub():
    """term(σ_hi, σ_lo) = (log σ_hi − log σ_lo)²: the sum is least with even steps in log σ (the logSNR grid)."""
    term = lambda hi, lo: (math.log(hi) - math.log(lo)) ** 2  # noqa: E731
    start = difflab.get_sigmas("karras", 6, 0.002, 80.0)
    refined, history = refine_schedule(term, start, rounds=12, candidates=8)
    target = difflab.get_sigmas("logsnr", 6, 0.002, 80.0)
    # coordinate descent on a quadratic with a shrinking window: within a few percent of log σ's range
    assert (refined.log() - target.log()).abs().max() < 0.05 * math.log(80.0 / 0.002)
    assert refined[0] == start[0] and refined[-1] == start[-1]                   # the ends are kept exactly
    assert all(b[1] <= a[1] for a, b in zip(history[:-1], history[1:]))     # a move is kept only if the KLUB drops


@pytest.fixture(scope="module")
def mixture():
    return difflab.GaussianMixture([[-4.0, 0.0], [3.0, 3.0], [2.0, -4.0]], stds=[[0.5, 1.0], [0.8, 0.4], [0.6, 0.7]],
                                   weights=[0.5, 0.3, 0.2])


# Held-out mean endpoint errors (fine_levels 60, 48 fit / 128 held-out draws), Karras ρ = 7 → AYS:
# ipndm NFE 5: 0.882 → 0.301; dpmpp_2m NFE 4: 1.085 → 0.817; ipndm NFE 8: 0.182 → 0.138. Each bound sits
# between the measured ratio (0.34, 0.75, 0.76) and 1.
@pytest.mark.parametrize("solver, nfe, at_most", [("ipndm", 5, 0.5), ("dpmpp_2m", 4, 0.9), ("ipndm", 8, 0.9)])
def test_ays_grid_beats_its_starting_karras_grid_on_held_out_noise(mixture, solver, nfe, at_most):
    config = GridConfig(fine_levels=60, n_fit=48, n_eval=128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                               # no "not better" warning either
        result = fit_grid(mixture, solver, nfe, "ays", config)
    metrics, grid = result.model.metrics, result.model
    assert metrics["learned_error"] < at_most * metrics["base_error"], metrics
    assert grid.method == "ays" and grid.sigmas[0] == 80.0 and grid.sigmas[-1] == pytest.approx(0.002, rel=1e-12)
    assert len(result.history) >= 2 and result.history[-1][1] < result.history[0][1]   # the KLUB dropped
