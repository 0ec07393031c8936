"""The Itô density estimator and its ODE form against exact log-densities.

1-D Gaussian: every term by hand. Mixtures: the estimated log q_i along sampled paths against the
exact `log_prob`, relative to the common start, with the error shrinking as the steps grow.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab import GaussianMixture, get_sigmas
from difflab.apps.demo.compose import demo_mixtures
from difflab.compose import Components, ito_increment, superdiff
from difflab.sampling import PerSampleGenerator, seeded_noise


def _gaussian_log_q(x: np.ndarray, mu: float, a: float, sigma: float) -> np.ndarray:
    """log N(x; μ, a² + σ²), by hand."""
    v = a**2 + sigma**2
    return -0.5 * (x - mu) ** 2 / v - 0.5 * np.log(2 * np.pi * v)


def _expected_increments(h: float, sigma: float, mu: float = 0.3, a: float = 0.7):
    """E_z of (the estimator's Δ log q, the exact change of log q) over one reverse-SDE step, for a
    1-D Gaussian q_σ = N(μ, a² + σ²) at several x. z = ±1 with weights ½ (2-point Gauss–Hermite) is
    exact here: the estimator is linear in z and the exact log q_σ' (x') quadratic."""
    x = np.linspace(-3.0, 3.0, 13)
    eps_hat = sigma * (x - mu) / (a**2 + sigma**2)               # (x − D)/σ, D = μ + a²(x − μ)/(a² + σ²)
    estimates, exact, right_point = [], [], []
    for z in (1.0, -1.0):
        dx = -2 * h * eps_hat + math.sqrt(2 * sigma * h) * z    # reverse SDE step, dσ = −h
        estimates.append(ito_increment(torch.tensor(dx)[:, None], torch.tensor(eps_hat)[None, :, None],
                                       sigma, h)[:, 0].numpy())
        exact.append(_gaussian_log_q(x + dx, mu, a, sigma - h) - _gaussian_log_q(x, mu, a, sigma))
        # the wrong time index: ε̂ taken after the step, at (x + dx, σ − h)
        eps_after = (sigma - h) * (x + dx - mu) / (a**2 + (sigma - h) ** 2)
        right_point.append(ito_increment(torch.tensor(dx)[:, None], torch.tensor(eps_after)[None, :, None],
                                         sigma, h)[:, 0].numpy())
    return np.mean(estimates, 0), np.mean(exact, 0), eps_hat, np.mean(right_point, 0)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_ito_increment_matches_the_exact_expected_change_on_a_1d_gaussian(sigma):
    errors = []
    for h in (1e-2 * sigma, 1e-3 * sigma):
        estimate, exact, eps_hat, right_point = _expected_increments(h, sigma)
        # by hand, to first order in h: E Δ log q = σh·s² = (h/σ)·ε̂² (left-point Itô drift + Laplacian terms)
        np.testing.assert_allclose(exact, (h / sigma) * eps_hat**2, rtol=0.05, atol=0.02 * np.abs(exact).max())
        errors.append(np.abs(estimate - exact).max() / np.abs(exact).max())
        # the public SD code's sign of the quadratic term: +(h/σ)ε̂² instead of −, i.e. Δ + 2(h/σ)ε̂²
        flipped = estimate + 2 * (h / sigma) * eps_hat**2
        assert np.abs(flipped - exact).max() / np.abs(exact).max() > 1.5
        # ε̂ at the end point instead of the start (not Itô): biased by a fixed fraction (14% at σ = 0.5)
        assert np.abs(right_point - exact).max() / np.abs(exact).max() > 0.1
    # a consistent estimator: relative error O(h) (0.01 → 0.001 gives ~10× smaller); 3% at h = σ/100
    assert errors[0] < 0.03 and errors[1] < errors[0] / 5


@pytest.fixture
def two_mixtures():
    """Two 2-D mixtures with disjoint components, > 6 stds apart."""
    a = GaussianMixture([[-4.0, 0.0], [3.0, 3.0]], stds=[0.5, 0.8], weights=[0.6, 0.4])
    b = GaussianMixture([[2.0, -4.0], [-3.0, 4.0]], stds=[0.6, 0.7], weights=[0.5, 0.5])
    return a, b


def _log_q_errors(models, steps: int, sde: bool, n: int) -> torch.Tensor:
    """|estimated − exact| log q_i(x_end) − log q_i(x_start) for OR paths: [n, M]. The ODE's
    divergence by reverse mode (4× faster than torch.func's jvp on the mixture; the same estimate,
    see test_jvp_and_vjp_give_the_same_hutchinson_estimate)."""
    sigmas = get_sigmas("karras", steps + 1, 0.01, 80.0)
    x_start = seeded_noise(range(n), (2,), 80.0, dtype=torch.float64)
    result = superdiff(Components.over_models(models, divergence="vjp"), x_start, sigmas, mode="or", sde=sde,
                       generator=PerSampleGenerator([10_000 + s for s in range(n)]))
    exact = torch.stack([m.log_prob(result.x, sigmas[-1]) - m.log_prob(x_start, sigmas[0]) for m in models], 1)
    return (result.log_q - exact).abs()


def test_sde_log_density_estimates_converge_to_exact_log_prob_along_paths(two_mixtures):
    errors = [_log_q_errors(two_mixtures, steps, sde=True, n=300).mean().item() for steps in (25, 100, 400)]
    # measured 5.0, 1.6, 0.55 nats (about N^-0.8): each 4× more steps at least halves the error; a
    # flipped quadratic term or a missing factor 2 in the drift leaves errors of tens of nats
    assert errors[1] < errors[0] / 2 and errors[2] < errors[1] / 2
    assert errors[2] < 1.0


def test_ode_log_density_estimates_converge_to_exact_log_prob_along_paths(two_mixtures):
    errors = [_log_q_errors(two_mixtures, steps, sde=False, n=150).mean().item() for steps in (12, 48)]
    # Euler + Hutchinson (1 Rademacher probe): measured ~3.4 → ~1.0 nats; a wrong sign of the
    # divergence or of ⟨s, v − u⟩ does not converge
    assert errors[1] < errors[0] / 2 and errors[1] < 1.5


def test_jvp_and_vjp_give_the_same_hutchinson_estimate(mixfull):
    """zᵀ(Jz) by forward mode and (zᵀJ)z by reverse mode are the same number; both equal the exact
    trace when averaged over all 2^D sign patterns of z (D = 2: Rademacher probes ±1)."""
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    estimates = {}
    for mode in ("jvp", "vjp"):
        components = Components.over_models([mixfull.model], divergence=mode)
        probes = [torch.tensor([s1, s2], dtype=torch.float64).expand(5, 2) for s1 in (1, -1) for s2 in (1, -1)]
        estimates[mode] = torch.stack([(components.evaluate(x, 0.7, probe=z).jvp[0] * z).sum(-1) for z in probes])
    torch.testing.assert_close(estimates["jvp"], estimates["vjp"])
    jacobian = torch.func.vmap(torch.func.jacrev(lambda y: (y - mixfull.model(y[None], torch.tensor([0.7],
                               dtype=torch.float64))[0]) / 0.7))(x)
    torch.testing.assert_close(estimates["jvp"].mean(0), jacobian.diagonal(dim1=1, dim2=2).sum(-1))


def test_and_noise_correction_removes_the_bias_of_the_papers_and_estimates():
    """AND's κ depends on the step's own noise and cancels its component along δ̂, so the plain Itô
    estimator misses −σh·δ̂ᵀ∇²log q δ̂ per step: a bias that stays as steps grow (measured ≈ −4 nats
    for both models). With `noise_correction` the error converges like OR's."""
    a, b = demo_mixtures()
    n = 150
    errors = {}
    for correct in (False, True):
        for steps in (50, 200):
            sigmas = get_sigmas("karras", steps + 1, 0.01, 80.0)
            x = seeded_noise(range(n), (2,), 80.0, dtype=torch.float64)
            result = superdiff(Components.over_models([a, b], divergence="vjp"), x, sigmas, mode="and",
                               noise_correction=correct, generator=PerSampleGenerator([7 + s for s in range(n)]))
            exact = torch.stack([m.log_prob(result.x, sigmas[-1]) - m.log_prob(x, sigmas[0]) for m in (a, b)], 1)
            errors[correct, steps] = (result.log_q - exact).abs().mean().item()
            torch.testing.assert_close(result.log_q[:, 0], result.log_q[:, 1], rtol=0, atol=1e-8)
    # measured: uncorrected 3.6 → 4.1 nats; corrected 0.96 → 0.46
    assert errors[False, 50] > 2.5 and errors[False, 200] > 2.5
    assert errors[True, 200] < errors[True, 50] / 1.5 and errors[True, 200] < 0.8
