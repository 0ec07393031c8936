"""Time grids against their formulas, solvers against exact probability-flow ODE solutions
(closed form for one Gaussian; a DOP853 reference at rtol 1e-12 for a mixture), and the
`sample` entry point's guards and per-sample seeding."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import difflab
from difflab import GaussianMixture, get_sigmas, sample, seeded_noise
from difflab.core.errors import ConfigError, NonFiniteError, ShapeError, SigmaRangeError, UnknownNameError
from difflab.sampling import SOLVERS, check_grid
from tests.conftest import np_denoiser
from tests.sampling.helpers import CountingDenoiser, as_f64, dop853_reference


# ----- grids ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, sigma_min, sigma_max, rho", [(10, 0.002, 80.0, 7.0), (2, 0.1, 1.0, 3.0),
                                                          (33, 0.05, 10.0, 1.0)])
def test_karras_grid_matches_eq5_starts_at_max_ends_at_min_and_decreases(n, sigma_min, sigma_max, rho):
    i = np.arange(n)
    expected = (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    grid = get_sigmas("karras", n, sigma_min, sigma_max, rho)
    assert grid.dtype == torch.float64 and grid.shape == (n,)
    np.testing.assert_allclose(grid.numpy(), expected, rtol=1e-12)  # float64 round-off of the power
    assert grid[0].item() == pytest.approx(sigma_max, rel=1e-12)
    assert grid[-1].item() == pytest.approx(sigma_min, rel=1e-12)
    assert bool((grid[1:] < grid[:-1]).all())
    torch.testing.assert_close(get_sigmas("polynomial", n, sigma_min, sigma_max, rho), grid, rtol=0, atol=0)


def test_logsnr_grid_has_constant_log_ratio():
    grid = get_sigmas("logsnr", 17, 0.01, 50.0)
    log_ratios = np.diff(np.log(grid.numpy()))
    # uniform in log σ: every step is (ln σmin − ln σmax)/(n − 1), to float64 round-off
    np.testing.assert_allclose(log_ratios, (math.log(0.01) - math.log(50.0)) / 16, rtol=1e-10)
    assert grid[0].item() == pytest.approx(50.0, rel=1e-12) and grid[-1].item() == pytest.approx(0.01, rel=1e-12)


@pytest.mark.parametrize("kind, rho", [("time_uniform", 1), ("time_quadratic", 2)])
@pytest.mark.parametrize("n, sigma_min, sigma_max",
                         [(10, 0.002, 80.0), (2, 0.01, 10.0), (3, 0.002, 1.0), (33, 0.01, 157.0)])
def test_vp_time_grids_match_their_formula_start_at_max_end_at_min_and_decrease(kind, rho, n, sigma_min, sigma_max):
    eps_s = 1e-3
    # log(1 + σ²) = ½β_d τ² + β_min τ at τ = 1 (σmax) and τ = ε_s (σmin), solved as a linear system
    beta_d, beta_min = np.linalg.solve([[0.5, 1.0], [0.5 * eps_s**2, eps_s]],
                                       [math.log(1 + sigma_max**2), math.log(1 + sigma_min**2)])
    tau = (1 + np.arange(n) / (n - 1) * (eps_s ** (1 / rho) - 1)) ** rho
    expected = np.sqrt(np.exp(0.5 * beta_d * tau**2 + beta_min * tau) - 1)
    grid = get_sigmas(kind, n, sigma_min, sigma_max)
    assert grid.dtype == torch.float64 and grid.shape == (n,)
    # float64 round-off, amplified by exp(x) − 1 at σ ~ 0.002 (x ~ 4e-6, 1e-16/4e-6 ~ 3e-11)
    np.testing.assert_allclose(grid.numpy(), expected, rtol=1e-9)
    assert grid[0].item() == pytest.approx(sigma_max, rel=1e-12)
    assert grid[-1].item() == pytest.approx(sigma_min, rel=1e-9)
    assert bool((grid[1:] < grid[:-1]).all())


def test_time_quadratic_grid_is_uniform_in_sqrt_vp_time():
    grid = get_sigmas("time_quadratic", 9, 0.002, 80.0)
    beta_d, beta_min = difflab.sampling.grids.vp_beta(0.002, 80.0)
    # invert σ(τ): ½β_d τ² + β_min τ = log(1 + σ²), the positive root
    tau = (-beta_min + np.sqrt(beta_min**2 + 2 * beta_d * np.log1p(grid.numpy() ** 2))) / beta_d
    np.testing.assert_allclose(np.diff(np.sqrt(tau)), (math.sqrt(1e-3) - 1) / 8, rtol=1e-6)  # root-finding round-off


@pytest.mark.parametrize("n", [2, 5, 11, 1000])
def test_discrete_sigmas_pick_table_levels_at_uniform_rounded_timesteps_from_the_top(n):
    betas = np.linspace(1e-4, 0.02, 1000)
    alphas_cumprod = np.cumprod(1 - betas)
    table = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    timesteps = np.round(np.linspace(999, 0, n)).astype(int)    # ties: numpy and torch both round half to even
    grid = difflab.sampling.discrete_sigmas(torch.as_tensor(alphas_cumprod), n)
    np.testing.assert_allclose(grid.numpy(), table[timesteps], rtol=1e-12)
    assert grid[0].item() == table[-1] and grid[-1].item() == table[0]   # the table's σmax and σmin
    assert bool((grid[1:] < grid[:-1]).all())


def test_discrete_grid_of_get_sigmas_uses_the_ddpm_table_inside_the_range():
    betas = np.linspace(1e-4, 0.02, 1000)
    alphas_cumprod = np.cumprod(1 - betas)
    table = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    full = get_sigmas("discrete", 6, table[0], table[-1])        # the whole table: starts at σmax, ends at σmin
    np.testing.assert_allclose(full.numpy(), table[np.round(np.linspace(999, 0, 6)).astype(int)], rtol=1e-12)
    inside = get_sigmas("discrete", 6, 0.05, 10.0)                # only table levels in [0.05, 10]
    assert float(inside.min()) >= 0.05 and float(inside.max()) <= 10.0 and bool((inside[1:] < inside[:-1]).all())
    with pytest.raises(SigmaRangeError, match="DDPM table"):
        get_sigmas("discrete", 6, 0.05, 0.06)                     # fewer than 6 table levels in range


def test_unknown_grid_name_raises_unknown_name_error():
    with pytest.raises(UnknownNameError, match="cosine"):
        get_sigmas("cosine", 10, 0.01, 10.0)


@pytest.mark.parametrize("n", [1, 0, -3, 2.5])
def test_grid_with_fewer_than_two_or_fractional_points_raises_config_error(n):
    with pytest.raises(ConfigError, match="n >= 2"):
        get_sigmas("karras", n, 0.01, 10.0)


@pytest.mark.parametrize("sigma_min, sigma_max", [(0.0, 1.0), (-0.1, 1.0), (2.0, 1.0), (1.0, 1.0), (0.1, math.inf)])
def test_grid_with_bad_sigma_range_raises_sigma_range_error(sigma_min, sigma_max):
    with pytest.raises(SigmaRangeError, match="sigma_min"):
        get_sigmas("logsnr", 10, sigma_min, sigma_max)


@pytest.mark.parametrize("grid, error", [
    ([1.0, 2.0, 3.0], ConfigError),             # increasing
    ([3.0, 2.0, 2.0, 1.0], ConfigError),        # repeated level
    ([3.0, float("nan"), 1.0], ConfigError),    # not finite
    ([[3.0, 2.0]], ConfigError),                # not 1-D
    ([3.0], ConfigError),                       # a single level
    ([3.0, 1.0, -0.5], SigmaRangeError),        # negative
    ([3.0, 0.0, -1.0], SigmaRangeError),        # zero before the end
], ids=["increasing", "repeated", "nan", "2d", "single", "negative", "zero-inside"])
def test_check_grid_rejects_bad_grids(grid, error):
    with pytest.raises(error):
        check_grid(torch.tensor(grid, dtype=torch.float64))


def test_check_grid_accepts_a_final_zero_and_enforces_the_model_range():
    grid = torch.tensor([3.0, 1.0, 0.2, 0.0], dtype=torch.float64)
    assert torch.equal(check_grid(grid, sigma_min=0.1, sigma_max=3.0), grid)
    with pytest.raises(SigmaRangeError, match="sigma_max"):
        check_grid(grid, sigma_max=2.0)
    with pytest.raises(SigmaRangeError, match="sigma_min"):
        check_grid(grid, sigma_min=0.5)


# ----- solvers against exact solutions -----------------------------------------------------------
def test_one_euler_and_one_heun_step_match_their_formulas(mix2d, rng):
    """x1 = x0 + (σ1 − σ0)·d0 (Euler); Heun averages d0 and d1 = ε̂(x0 + (σ1 − σ0)·d0; σ1)."""
    x0, (s0, s1) = 4 * rng.standard_normal((6, 2)), (2.0, 1.3)
    d0 = (x0 - np_denoiser(mix2d, x0, s0)) / s0
    x_euler = x0 + (s1 - s0) * d0
    d1 = (x_euler - np_denoiser(mix2d, x_euler, s1)) / s1
    grid = as_f64([s0, s1])
    # float64 round-off; using σ1 for d0 or dropping the ½ changes x1 by > 0.01
    np.testing.assert_allclose(sample(mix2d.model, as_f64(x0), grid, "euler").numpy(), x_euler, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sample(mix2d.model, as_f64(x0), grid, "heun").numpy(), x0 + (s1 - s0) * (d0 + d1) / 2,
                               rtol=0, atol=1e-12)


MU, STD = np.array([1.0, -2.0]), np.array([0.5, 2.0])  # one Gaussian, diagonal


def _single_gaussian_solution(x_start, sigma_start, sigma_end):
    """PF-ODE for N(μ, s²) per coordinate: x(σ) = μ + (x(σ0) − μ)·sqrt((s² + σ²)/(s² + σ0²))."""
    return MU + (x_start - MU) * np.sqrt((STD**2 + sigma_end**2) / (STD**2 + sigma_start**2))


def _errors(denoiser, x_start, reference, solver, kind, step_counts, sigma_min, sigma_max):
    return np.array([np.abs(sample(denoiser, as_f64(x_start), get_sigmas(kind, steps + 1, sigma_min, sigma_max),
                                   solver=solver).numpy() - reference).max() for steps in step_counts])


@pytest.mark.parametrize("kind", ["logsnr", "karras"])
def test_euler_is_first_and_heun_second_order_on_single_gaussian(kind, rng):
    gaussian = GaussianMixture(MU[None], stds=STD[None])
    sigma_max, sigma_min = 10.0, 0.05
    x_start = sigma_max * rng.standard_normal((16, 2))
    exact = _single_gaussian_solution(x_start, sigma_max, sigma_min)
    euler_err = _errors(gaussian, x_start, exact, "euler", kind, [16, 32, 64], sigma_min, sigma_max)
    heun_err = _errors(gaussian, x_start, exact, "heun", kind, [16, 32, 64], sigma_min, sigma_max)
    # halving h divides an O(h^p) error by 2^p; measured 1.96–1.98 and 4.05–4.16 here, so these ranges
    # leave room for higher-order terms yet exclude the neighbouring order
    assert ((euler_err[:-1] / euler_err[1:] > 1.8) & (euler_err[:-1] / euler_err[1:] < 2.2)).all(), euler_err
    assert ((heun_err[:-1] / heun_err[1:] > 3.5) & (heun_err[:-1] / heun_err[1:] < 4.6)).all(), heun_err
    # at 64 steps from |x| ~ 10: Heun within 1e-2 of the closed form, Euler within 0.2 (measured 4e-3, 0.12)
    assert heun_err[-1] < 1e-2 and euler_err[-1] < 0.2


def test_euler_is_first_and_heun_second_order_on_mixture_against_dop853_reference(mix2d, rng):
    sigma_max, sigma_min = 10.0, 0.05
    x_start = sigma_max * rng.standard_normal((16, 2))

    reference = dop853_reference(mix2d, x_start, sigma_max, sigma_min)
    euler_err = _errors(mix2d.model, x_start, reference, "euler", "logsnr", [32, 64], sigma_min, sigma_max)
    heun_err = _errors(mix2d.model, x_start, reference, "heun", "logsnr", [32, 64], sigma_min, sigma_max)
    # measured ratios 2.05 and 4.18 on this grid; the ranges exclude the neighbouring order
    assert 1.7 < euler_err[0] / euler_err[1] < 2.4, euler_err
    assert 3.4 < heun_err[0] / heun_err[1] < 4.8, heun_err
    assert heun_err[-1] < 5e-3


# ----- sample(): final zero, NFE, seeding, guards --------------------------------------------------
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_sample_to_sigma_zero_returns_the_denoiser_output_at_the_last_positive_sigma(mix2d, solver, rng):
    grid = get_sigmas("logsnr", 9, 0.05, 10.0)
    grid_to_zero = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
    x_start = as_f64(10 * rng.standard_normal((6, 2)))
    counting = CountingDenoiser(mix2d.model)
    out = sample(counting, x_start, grid_to_zero, solver=solver)
    x_last = sample(mix2d.model, x_start, grid, solver=solver).numpy()
    # x + (0 − σ)(x − D)/σ = D up to round-off
    np.testing.assert_allclose(out.numpy(), np_denoiser(mix2d, x_last, float(grid[-1])), rtol=0, atol=1e-12)
    expected_nfe = {"euler": 9, "heun": 2 * 9 - 1}[solver]     # N = 10 points: Heun skips the σ=0 correction
    assert counting.calls == expected_nfe == SOLVERS[solver].nfe(10, True, False)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_every_solver_steps_to_sigma_zero_with_one_evaluation_returning_the_denoised_state(mix2d, solver, rng):
    grid = torch.cat([get_sigmas("logsnr", 9, 0.05, 10.0), torch.zeros(1, dtype=torch.float64)])
    states, counting = {}, CountingDenoiser(mix2d.model)
    out = sample(counting, as_f64(10 * rng.standard_normal((6, 2))), grid, solver=solver,
                 generator=torch.Generator().manual_seed(0), callback=lambda i, x, s: states.setdefault(i, x))
    # the last step is x ← D(x; σ_{N−2}) (up to round-off), whatever the solver's own update
    np.testing.assert_allclose(out.numpy(), np_denoiser(mix2d, states[7].numpy(), float(grid[-2])), rtol=0, atol=1e-12)
    assert counting.calls == SOLVERS[solver].nfe(len(grid), True, False)


def test_seeded_noise_rows_depend_only_on_their_own_seed():
    seeds = [11, 5, 2024, 7, 0, 99, 123456, 3]
    whole = seeded_noise(seeds, (2, 3), sigma_max=10.0, dtype=torch.float64)
    split = torch.cat([seeded_noise(seeds[:3], (2, 3), 10.0, torch.float64),
                       seeded_noise(seeds[3:], (2, 3), 10.0, torch.float64)])
    assert torch.equal(whole, split)
    for row, seed in zip(whole, seeds):
        assert torch.equal(row, 10.0 * torch.randn((2, 3), generator=torch.Generator().manual_seed(seed),
                                                   dtype=torch.float64))
    assert not torch.equal(whole[0], whole[1])


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_sample_rows_are_identical_whether_run_as_one_batch_or_split(mix2d, solver):
    seeds, grid = list(range(100, 108)), get_sigmas("karras", 12, 0.02, 10.0)
    one_batch = sample(mix2d.model, seeded_noise(seeds, (2,), 10.0, torch.float64), grid, solver=solver)
    split = torch.cat([sample(mix2d.model, seeded_noise(s, (2,), 10.0, torch.float64), grid, solver=solver)
                       for s in (seeds[:3], seeds[3:])])
    assert torch.equal(one_batch, split)


def _nan_below(threshold):
    def denoiser(x, sigma, **cond):
        out = torch.zeros_like(x)
        return torch.where((sigma < threshold)[:, None], torch.full_like(x, math.nan), out)
    return denoiser


@pytest.mark.parametrize("solver, step", [("euler", 3), ("heun", 2)])
def test_nan_from_the_denoiser_raises_non_finite_error_naming_solver_and_step(solver, step, rng):
    grid = get_sigmas("logsnr", 6, 0.1, 10.0)  # 10, 3.98, 1.58, 0.63, 0.25, 0.1
    # NaN for σ < 1: Euler first evaluates σ_3 = 0.63 at step 3; Heun already at step 2 (its corrector)
    with pytest.raises(NonFiniteError, match=rf"'{solver}'.*step {step}\b"):
        sample(_nan_below(1.0), as_f64(rng.standard_normal((4, 2))), grid, solver=solver)


def test_unknown_solver_raises_unknown_name_error_before_any_call(mix2d):
    counting = CountingDenoiser(mix2d.model)
    with pytest.raises(UnknownNameError, match="rk45"):
        sample(counting, torch.zeros(2, 2, dtype=torch.float64), get_sigmas("karras", 5, 0.1, 1.0), solver="rk45")
    assert counting.calls == 0


def test_shape_mismatch_with_denoiser_data_shape_raises_shape_error_before_any_call(mix2d):
    counting = CountingDenoiser(mix2d.model)
    with pytest.raises(ShapeError, match=r"\(3,\).*\(2,\)"):
        sample(counting, torch.zeros(4, 3, dtype=torch.float64), get_sigmas("karras", 5, 0.1, 1.0))
    assert counting.calls == 0


def test_sample_of_image_shaped_mixture_keeps_the_shape(rng):
    model = GaussianMixture(rng.standard_normal((2, 4)), stds=[0.5, 1.0], data_shape=(1, 2, 2))
    x = difflab.seeded_noise([1, 2, 3], (1, 2, 2), 5.0, torch.float64)
    assert sample(model, x, get_sigmas("karras", 6, 0.05, 5.0)).shape == (3, 1, 2, 2)


@pytest.mark.parametrize("kind", ["time_uniform", "time_quadratic"])
def test_vp_time_grid_over_a_range_no_increasing_schedule_covers_is_refused(kind):
    # σ ∈ [0.5, 1] forces β_d < 0 with β_d + β_min < 0: σ(τ) would rise past σ_max inside the range
    with pytest.raises(SigmaRangeError, match="no increasing VP schedule"):
        get_sigmas(kind, 4, 0.5, 1.0)
