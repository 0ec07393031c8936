"""The ODE-block integrators against exact solutions: linear ODEs (the matrix exponential and each
method's Taylor polynomial) and quadratures of time-dependent right-hand sides."""

import math

import pytest
import torch

from difflab.core.errors import ConfigError
from difflab.nets.ode import ODESolver, integrate, torchdiffeq_available

ORDERS = {"euler": 1, "midpoint": 2, "rk4": 4}


def linear_system(seed=0, dim=4):
    """A [dim, dim] matrix with spectrum of size ~1, and a batch of 3 initial states, float64."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
    h0 = torch.randn(3, dim, generator=generator, dtype=torch.float64)
    return matrix, h0


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_one_step_is_the_methods_taylor_polynomial_of_the_matrix_exponential(method):
    # dh/ds = A h: one explicit RK step of order p maps h0 to Σ_{k≤p} A^k h0 / k! exactly
    matrix, h0 = linear_system()
    h1 = integrate(lambda s, h: h @ matrix.T, h0, ODESolver(method, steps=1))
    taylor, term = torch.zeros_like(h0), h0
    for k in range(ORDERS[method] + 1):
        taylor = taylor + term
        term = term @ matrix.T / (k + 1)
    torch.testing.assert_close(h1, taylor, rtol=0, atol=1e-13)  # float64 round-off only


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_error_to_the_exact_exponential_shrinks_at_the_methods_order(method):
    matrix, h0 = linear_system(seed=1)
    exact = h0 @ torch.linalg.matrix_exp(matrix).T
    errors = [float((integrate(lambda s, h: h @ matrix.T, h0, ODESolver(method, steps)) - exact).abs().max())
              for steps in (8, 16, 32)]
    observed = [math.log2(coarse / fine) for coarse, fine in zip(errors, errors[1:])]
    # halving Δs divides the error by 2^p; ±0.25 leaves room for the next term, not a wrong order
    assert all(abs(order - ORDERS[method]) < 0.25 for order in observed), observed


@pytest.mark.parametrize(
    "method, rate, exact",  # one step of each method integrates these polynomials in s exactly
    [("euler", lambda s: 1.0 + 0 * s, 1.0), ("midpoint", lambda s: 2 * s, 1.0),
     ("rk4", lambda s: 4 * s**3, 1.0)],
)
def test_time_argument_reaches_f_at_the_right_stage_times(method, rate, exact):
    # dh/ds = g(s), h(0) = 0 -> h(1) = ∫₀¹ g: exact for the method's quadrature degree, so a wrong
    # stage time (s + Δs/2, s + Δs) gives a wrong number
    h0 = torch.zeros(2, 1, dtype=torch.float64)
    for steps in (1, 3):
        h1 = integrate(lambda s, h: rate(s) * torch.ones_like(h), h0, ODESolver(method, steps))
        torch.testing.assert_close(h1, torch.full_like(h0, exact), rtol=0, atol=1e-14)


def test_euler_with_n_steps_is_the_left_riemann_sum():
    h0 = torch.zeros(1, dtype=torch.float64)
    h1 = integrate(lambda s, h: s * torch.ones_like(h), h0, ODESolver("euler", steps=4))
    assert float(h1) == pytest.approx((0 + 0.25 + 0.5 + 0.75) / 4, abs=1e-15)


def test_bad_solver_options_are_refused():
    with pytest.raises(ConfigError, match="fixed-step"):
        ODESolver("dopri5")
    with pytest.raises(ConfigError, match="positive int"):
        ODESolver("rk4", steps=0)
    with pytest.raises(ConfigError, match="adjoint"):
        ODESolver("rk4", adjoint=True)
    with pytest.raises(ConfigError, match="backend"):
        ODESolver("rk4", backend="scipy")


@pytest.mark.skipif(not torchdiffeq_available(), reason="torchdiffeq not installed")
def test_torchdiffeq_adaptive_method_reaches_the_exact_exponential():
    matrix, h0 = linear_system(seed=2)
    solver = ODESolver("dopri5", backend="torchdiffeq", rtol=1e-10, atol=1e-12)
    h1 = integrate(lambda s, h: h @ matrix.T, h0, solver)
    torch.testing.assert_close(h1, h0 @ torch.linalg.matrix_exp(matrix).T, rtol=0, atol=1e-9)


@pytest.mark.skipif(not torchdiffeq_available(), reason="torchdiffeq not installed")
def test_torchdiffeq_adjoint_gradients_equal_backpropagated_ones():
    matrix, h0 = linear_system(seed=3)
    gradients = []
    for adjoint in (False, True):
        weight = matrix.clone().requires_grad_(True)
        start = h0.clone().requires_grad_(True)
        solver = ODESolver("dopri5", backend="torchdiffeq", rtol=1e-10, atol=1e-12, adjoint=adjoint)
        field = lambda s, h, weight=weight: h @ weight.T    # this iteration's weight (backward() runs in it too)
        integrate(field, start, solver, adjoint_params=(weight,)).square().sum().backward()
        gradients.append((weight.grad, start.grad))
    for direct, adjoint in zip(*gradients):
        torch.testing.assert_close(adjoint, direct, rtol=1e-6, atol=1e-8)  # both solved to 1e-10
