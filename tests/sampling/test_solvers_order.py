"""Solvers against exact answers: empirical convergence order (closed-form PF-ODE of one Gaussian,
a DOP853 reference for a mixture, a closed-form quadrature for DPM-Solver++(3M)), the analytical
first step (AFS), Euler–Maruyama's endpoint distribution and per-sample seeding, and grids that
spend an exact NFE budget."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab import GaussianMixture, get_sigmas, sample, sigmas_for_nfe
from difflab.core.errors import ConfigError, UnknownNameError
from difflab.metrics.distances import sliced_wasserstein
from difflab.sampling import SOLVERS, PerSampleGenerator, seeded_noise
from tests.conftest import np_denoiser
from tests.sampling.helpers import CountingDenoiser, as_f64, dop853_reference
from tests.sampling.test_grids_and_solvers import MU, STD, _single_gaussian_solution

SIGMA_MAX, SIGMA_MIN = 10.0, 0.05
STEPS = [32, 64, 128]          # asymptotic regime: successive error ratios within 0.05 of 2^p (measured)
DETERMINISTIC_ORDER = {"euler": 1, "heun": 2, "dpm2": 2, "dpmpp_2m": 2}


def _slope(denoiser, x_start, reference, solver, kind="logsnr", steps=STEPS):
    """−d log(max error)/d log(step count), least squares over `steps`; also the errors."""
    errors = np.array([np.abs(sample(denoiser, as_f64(x_start), get_sigmas(kind, n + 1, SIGMA_MIN, SIGMA_MAX),
                                     solver=solver).numpy() - reference).max() for n in steps])
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0], errors


@pytest.fixture
def gaussian_case(rng):
    x_start = SIGMA_MAX * rng.standard_normal((16, 2))
    return GaussianMixture(MU[None], stds=STD[None]), x_start, _single_gaussian_solution(x_start, SIGMA_MAX, SIGMA_MIN)


@pytest.fixture
def mixture_case(mix2d, rng):
    x_start = SIGMA_MAX * rng.standard_normal((16, 2))

    return mix2d.model, x_start, dop853_reference(mix2d, x_start, SIGMA_MAX, SIGMA_MIN)


# ----- convergence order ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["logsnr", "karras"])
@pytest.mark.parametrize("solver", sorted(DETERMINISTIC_ORDER))
def test_solver_has_its_order_on_single_gaussian_closed_form(solver, kind, gaussian_case):
    slope, errors = _slope(*gaussian_case, solver, kind)
    # measured slopes 0.99 (Euler) and 1.98–2.03 (2nd order); ±0.3 leaves room for higher-order
    # terms and excludes the neighbouring order (a broken coefficient drops a 2nd-order method to 1)
    assert abs(slope - DETERMINISTIC_ORDER[solver]) < 0.3, (slope, errors)
    assert SOLVERS[solver].order == DETERMINISTIC_ORDER[solver]


@pytest.mark.parametrize("solver", sorted(DETERMINISTIC_ORDER))
def test_solver_has_its_order_on_mixture_against_dop853_reference(solver, mixture_case):
    slope, errors = _slope(*mixture_case, solver)
    assert abs(slope - DETERMINISTIC_ORDER[solver]) < 0.3, (slope, errors)   # measured 0.99, 1.98–2.02
    assert errors[-1] < {1: 0.1, 2: 2e-3}[DETERMINISTIC_ORDER[solver]]       # measured 0.032 and ≤ 6.6e-4 at 128


def _quadrature_denoiser(x, sigma, **cond):
    """x-independent D = cos(λ − λ0), λ = −ln σ: the ODE dx/dλ = D − x becomes pure quadrature,
    x(λ) = e^{−(λ−λ0)}x0 + ∫ e^{s−λ} cos(s − λ0) ds, and dD/dλ = 0 at λ0, so the first-order
    first step of a multistep method costs O(h³), not O(h²)."""
    lam = -sigma.log() + math.log(SIGMA_MAX)
    return torch.cos(lam)[:, None] * torch.ones_like(x)


def _quadrature_solution(x_start):
    span = math.log(SIGMA_MAX / SIGMA_MIN)
    antiderivative = lambda u: math.exp(u) * (math.cos(u) + math.sin(u)) / 2   # of e^u cos u
    return math.exp(-span) * (x_start + antiderivative(span) - antiderivative(0.0))


def test_dpmpp_3m_taylor_is_third_order_on_a_closed_form_quadrature():
    """The Taylor-consistent 3M update (second difference weighted by 2φ3) integrates a smooth D(λ)
    to 3rd order. The reference weight φ3 (dpmpp_3m, as diffusers) is not: its log2 error ratios
    here are 3.3, 4.8, 0.9, 1.2, 1.7 from 16 to 512 steps, tending to 2."""
    x_start = np.array([[1.0, -2.0], [0.5, 3.0]])
    slope, errors = _slope(_quadrature_denoiser, x_start, _quadrature_solution(x_start), "dpmpp_3m_taylor",
                           steps=[16, 32, 64, 128])
    assert abs(slope - 3) < 0.3, (slope, errors)                # measured 2.96
    # every halving of h, not just the fit: measured 2.91, 2.98, 3.00; with the φ3 weight errors
    # cancel erratically (3.3, 4.8, 0.9) and the fit alone would pass
    assert (np.abs(np.log2(errors[:-1] / errors[1:]) - 3) < 0.3).all(), errors
    slope_2m, _ = _slope(_quadrature_denoiser, x_start, _quadrature_solution(x_start), "dpmpp_2m",
                         steps=[16, 32, 64, 128])
    assert abs(slope_2m - 2) < 0.3, slope_2m                    # measured 2.16


@pytest.mark.parametrize("solver", ["dpmpp_3m", "dpmpp_3m_taylor"])
@pytest.mark.parametrize("case", ["gaussian_case", "mixture_case"])
def test_dpmpp_3m_beats_2m_but_its_first_order_start_makes_it_second_order_on_mixtures(solver, case, request):
    """On a real ODE the first step (first order, as in DPM-Solver++ and diffusers) has an O(h²)
    local error that propagates to the end, so 3M converges at order 2 asymptotically (Taylor
    variant: slopes 2.5 → 2.0 measured from 16 to 256 steps), with a smaller error than 2M."""
    slope_3m, errors_3m = _slope(*request.getfixturevalue(case), solver)
    _, errors_2m = _slope(*request.getfixturevalue(case), "dpmpp_2m")
    assert 1.8 < slope_3m < 3.3, (slope_3m, errors_3m)          # measured 2.08–2.32 over 32–128 steps
    assert (errors_3m < errors_2m).all(), (errors_3m, errors_2m)  # measured 2.5–12× smaller


# ----- analytical first step ----------------------------------------------------------------------
@pytest.mark.parametrize("to_zero", [False, True])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_afs_saves_exactly_one_evaluation(solver, to_zero, mix2d, rng):
    grid = get_sigmas("karras", 6, 0.05, 10.0)
    if to_zero:
        grid = torch.cat([grid, grid.new_zeros(1)])
    calls = {}
    for afs in (False, True):
        counting = CountingDenoiser(mix2d.model)
        sample(counting, as_f64(10 * rng.standard_normal((4, 2))), grid, solver=solver, afs=afs,
               generator=torch.Generator().manual_seed(0))
        calls[afs] = counting.calls
        assert counting.calls == SOLVERS[solver].nfe(len(grid), to_zero, afs)
    assert calls[False] - calls[True] == 1, calls


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "dpmpp_3m", "dpmpp_3m_taylor"])
def test_afs_first_step_of_first_order_start_is_x_times_one_plus_h_over_sqrt_one_plus_sigma0_squared(solver, mix2d,
                                                                                                       rng):
    grid = get_sigmas("karras", 5, 0.05, 10.0)
    x_start, states = 10 * rng.standard_normal((4, 2)), {}
    sample(mix2d.model, as_f64(x_start), grid, solver=solver, afs=True,
           callback=lambda i, x, s: states.setdefault(i, x))
    s0, s1 = float(grid[0]), float(grid[1])
    # exact formula; float64 round-off only (DPM-Solver++'s first step is DDIM = Euler in σ-space)
    np.testing.assert_allclose(states[0].numpy(), x_start * (1 + (s1 - s0) / math.sqrt(1 + s0**2)), rtol=1e-12)


def test_afs_first_step_of_heun_and_dpm2_uses_the_analytical_slope_then_the_model(mix2d, rng):
    grid = get_sigmas("karras", 5, 0.05, 10.0)
    x0, s0, s1 = 10 * rng.standard_normal((4, 2)), float(grid[0]), float(grid[1])
    d0 = x0 / math.sqrt(1 + s0**2)
    eps_np = lambda x, s: (x - np_denoiser(mix2d, x, s)) / s
    x_euler, s_mid = x0 + (s1 - s0) * d0, math.sqrt(s0 * s1)
    expected = {"heun": x0 + (s1 - s0) * (d0 + eps_np(x_euler, s1)) / 2,
                "dpm2": x0 + (s1 - s0) * eps_np(x0 + (s_mid - s0) * d0, s_mid)}
    for solver, x1 in expected.items():
        states = {}
        sample(mix2d.model, as_f64(x0), grid, solver=solver, afs=True,
               callback=lambda i, x, s, states=states: states.setdefault(i, x))
        np.testing.assert_allclose(states[0].numpy(), x1, rtol=0, atol=1e-10)   # round-off of scipy vs torch


# ----- Euler–Maruyama ----------------------------------------------------------------------------------
def test_euler_maruyama_endpoint_matches_the_mixture_in_sliced_wasserstein(mix2d):
    n, generator = 10_000, torch.Generator().manual_seed(7)
    exact = [mix2d.model.sample(n, generator=generator, dtype=torch.float64) for _ in range(8)]
    # the floor: mean SW between two exact sample sets of this size (mode weights fluctuate by
    # ~sqrt(w(1−w)/n)); measured 0.10–0.25 over seeds 7–12. 64 fixed projections (the same for every
    # comparison) suffice in 2-D and keep the test fast
    floor = np.mean([sliced_wasserstein(exact[0], exact[k], n_projections=64) for k in range(1, 8)])
    grid = torch.cat([get_sigmas("karras", 100, 0.005, 40.0), torch.zeros(1, dtype=torch.float64)])
    x = sample(mix2d.model, 40.0 * torch.randn(n, 2, generator=generator, dtype=torch.float64), grid,
               solver="euler_maruyama", generator=generator)
    # 2× the floor: over seeds 7–12 the solver sits at 0.38–0.82 of it, while half the drift or half the
    # noise lands at 1.7–3.6 of it. The σ=40 start ignores p0's spread (variance 1600 vs 1600 + ~10).
    distance = sliced_wasserstein(x, exact[0], n_projections=64)
    assert distance < 2 * floor, (distance, floor)


def test_euler_maruyama_is_reproducible_per_sample_whatever_the_batch_split(mix2d):
    seeds, grid = list(range(40, 48)), get_sigmas("karras", 12, 0.02, 10.0)

    def run(chunk):
        return sample(mix2d.model, seeded_noise(chunk, (2,), 10.0, torch.float64), grid, solver="euler_maruyama",
                      generator=PerSampleGenerator([s + 1000 for s in chunk]))

    whole = run(seeds)
    assert torch.equal(whole, torch.cat([run(seeds[:3]), run(seeds[3:])]))
    assert torch.equal(whole[5:6], run(seeds[5:6]))
    other = sample(mix2d.model, seeded_noise(seeds, (2,), 10.0, torch.float64), grid, solver="euler_maruyama",
                   generator=PerSampleGenerator([s + 2000 for s in seeds]))
    assert not torch.allclose(whole, other)                      # the per-step noise matters


def test_euler_maruyama_step_matches_its_formula(mix2d, rng):
    """x' = x + 2(σ1 − σ0)ε̂ + sqrt(2σ0|σ1 − σ0|)·z, with z the generator's next draw."""
    x0, (s0, s1) = 4 * rng.standard_normal((6, 2)), (2.0, 1.3)
    z = torch.randn((6, 2), generator=torch.Generator().manual_seed(3), dtype=torch.float64).numpy()
    out = sample(mix2d.model, as_f64(x0), as_f64([s0, s1]), "euler_maruyama",
                 generator=torch.Generator().manual_seed(3))
    expected = x0 + 2 * (s1 - s0) * (x0 - np_denoiser(mix2d, x0, s0)) / s0 + math.sqrt(2 * s0 * (s0 - s1)) * z
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)   # float64 round-off


# ----- exact NFE budgets ---------------------------------------------------------------------------------
def _calls(solver, grid, mix2d, afs):
    counting = CountingDenoiser(mix2d.model)
    sample(counting, torch.ones(2, 2, dtype=torch.float64), grid, solver=solver, afs=afs,
           generator=torch.Generator().manual_seed(0))
    return counting.calls


@pytest.mark.parametrize("to_zero", [False, True])
@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_sigmas_for_nfe_spends_exactly_the_budget_or_raises_config_error(solver, afs, to_zero, mix2d):
    # budgets the solver really spends (counted) on karras grids of 3..14 points (to_zero: 2..13 + 0)
    spendable = {}
    for n in range(3, 15):
        grid = get_sigmas("karras", n - int(to_zero), 0.05, 10.0)
        grid = torch.cat([grid, grid.new_zeros(1)]) if to_zero else grid
        spendable.setdefault(_calls(solver, grid, mix2d, afs), n)
    for nfe in range(3, 11):
        if nfe in spendable:
            grid = sigmas_for_nfe(solver, nfe, sigma_min=0.05, sigma_max=10.0, afs=afs, to_zero=to_zero)
            assert len(grid) == spendable[nfe] and _calls(solver, grid, mix2d, afs) == nfe
            assert float(grid[0]) == pytest.approx(10.0) and (float(grid[-1]) == 0 if to_zero else
                                                              float(grid[-1]) == pytest.approx(0.05))
        else:
            with pytest.raises(ConfigError, match=rf"'{solver}'.*exactly {nfe} evaluations.*nearest budgets"):
                sigmas_for_nfe(solver, nfe, afs=afs, to_zero=to_zero)


def test_sigmas_for_nfe_rejects_an_unknown_solver_and_an_impossible_budget_by_name():
    with pytest.raises(UnknownNameError, match="rk45"):
        sigmas_for_nfe("rk45", 5)
    with pytest.raises(ConfigError, match=r"'heun'.*exactly 5 evaluations.*nearest budgets: 4 or 6"):
        sigmas_for_nfe("heun", 5)                                # Heun spends 2(n − 1): even budgets only
    assert len(sigmas_for_nfe("heun", 5, afs=True)) == 4         # AFS makes it odd: 2·3 − 1
