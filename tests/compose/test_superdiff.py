"""SuperDiff OR / AND / averaging against exact answers on Gaussian mixtures, and the κ rules."""
from __future__ import annotations

import math

import pytest
import torch

from difflab import GaussianMixture, get_sigmas
from difflab.compose import Components, and_kappa_system, and_kappa_two, ito_increment, or_kappa, superdiff
from difflab.compose.ito import ode_increment
from difflab.compose.superdiff import drift_matrix, field_basis, mix
from difflab.core.errors import ConfigError, NonFiniteError, SigmaRangeError, UnknownNameError
from difflab.sampling import PerSampleGenerator, seeded_noise


def _run(models, mode, n, steps=50, seed=0, **kwargs):
    sigmas = get_sigmas("karras", steps + 1, 0.01, 80.0)
    x = seeded_noise(range(seed, seed + n), (2,), 80.0, dtype=torch.float64)
    generator = PerSampleGenerator([10_000 + s for s in range(seed, seed + n)])
    return superdiff(models, x, sigmas, mode=mode, generator=generator, **kwargs), sigmas


# ----- OR -------------------------------------------------------------------------------------------
def _component_frequencies(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    return torch.bincount(torch.cdist(x.double(), means.double()).argmin(1), minlength=len(means)) / len(x)


def _chi2(freq: torch.Tensor, expected: torch.Tensor, n: int) -> float:
    return float((n * (freq - expected) ** 2 / expected).sum())


def test_or_at_temperature_one_samples_the_exact_equal_weight_mixture():
    a = GaussianMixture([[-4.0, 0.0], [3.0, 3.0]], stds=[0.5, 0.8], weights=[0.6, 0.4])
    b = GaussianMixture([[2.0, -4.0], [-3.0, 4.0]], stds=[0.6, 0.7], weights=[0.5, 0.5])
    means = torch.cat([a.means, b.means])
    expected = torch.cat([a.weights, b.weights]) / 2                # ½A + ½B: [0.3, 0.2, 0.25, 0.25]
    n = 2000
    result, _ = _run([a, b], "or", n)
    # χ² with 3 degrees of freedom: 16.3 is its 99.9% quantile (measured 2.4)
    assert _chi2(_component_frequencies(result.x, means), expected, n) < 16.3
    # the same check rejects averaging the two ε̂ (κ = ½ throughout): measured χ² ≈ 170
    averaged, _ = _run([a, b], "average", n)
    assert _chi2(_component_frequencies(averaged.x, means), expected, n) > 50


def test_or_kappa_is_a_stable_softmax_of_tempered_log_densities():
    log_q = torch.tensor([[0.0, math.log(3.0)], [-1e4, -1e4 + math.log(3.0)]], dtype=torch.float64)
    kappa = or_kappa(log_q, temperature=1.0)
    torch.testing.assert_close(kappa, torch.tensor([[0.25, 0.75], [0.25, 0.75]], dtype=torch.float64))
    biased = or_kappa(log_q, temperature=2.0, bias=torch.tensor([math.log(9.0), 0.0]))
    torch.testing.assert_close(biased, torch.full((2, 2), 0.5, dtype=torch.float64))


# ----- AND ------------------------------------------------------------------------------------------
def test_and_ends_where_the_exact_log_densities_are_equal():
    a = GaussianMixture([[-2.0, 0.0], [0.0, 2.5]], stds=[1.0, 0.7], weights=[0.6, 0.4])
    b = GaussianMixture([[2.5, 1.0], [0.5, 2.0]], stds=[1.2, 0.8], weights=[0.5, 0.5])
    gaps = {}
    for name, mode, bias in (("and", "and", None), ("or", "or", None), ("a alone", "average", [0, -math.inf]),
                             ("b alone", "average", [-math.inf, 0])):
        result, sigmas = _run([a, b], mode, 400, bias=bias)
        gaps[name] = (a.log_prob(result.x, sigmas[-1]) - b.log_prob(result.x, sigmas[-1])).abs().median().item()
        if mode == "and":    # the estimated log-densities are equal by construction
            torch.testing.assert_close(result.log_q[:, 0], result.log_q[:, 1], rtol=0, atol=1e-8)
    # measured median |log q_a − log q_b| (nats): AND 0.19; OR 2.7, a alone 3.1, b alone 2.5
    assert gaps["and"] < 0.5
    assert min(gaps["or"], gaps["a alone"], gaps["b alone"]) > 1.5


def _random_step(m: int, n: int = 6, dim: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    eps_models = torch.randn(m, n, dim, generator=g, dtype=torch.float64)
    eps_uncond = torch.randn(n, dim, generator=g, dtype=torch.float64)
    z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    return eps_models, eps_uncond, z


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("w", [None, 1.5])
@pytest.mark.parametrize("sde", [True, False])
def test_and_kappa_makes_every_realised_increment_equal(m, w, sde):
    """Whatever the models, guidance and noise: after the AND step, Δ log q_i from the estimator on the
    realised increment is the same for all i, and Δ_1 − Δ_2 = (ℓ_1 − ℓ_2)·h/σ with a bias."""
    eps_models, eps_uncond, z = _random_step(m)
    sigma, h = 1.3, 0.05
    divergence = torch.randn(m, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c0, c = field_basis(eps_models, eps_uncond if w is not None else None, w)
    bias = torch.linspace(0.0, 1.0, m, dtype=torch.float64)
    xi = math.sqrt(2 * sigma * h) * z
    if sde:
        drift_scale, constant = -2 * h, ito_increment((0 if c0 is None else -2 * h * c0) + xi, eps_models, sigma, h)
    else:
        drift_scale = -h
        constant = ode_increment(torch.zeros_like(z) if c0 is None else c0, eps_models, divergence, sigma, h)
    A, b = drift_matrix(eps_models, c, drift_scale, sigma), constant
    for ell in (torch.zeros(m, dtype=torch.float64), bias):
        solve = and_kappa_two if m == 2 else and_kappa_system
        kappa, guarded = solve(A, b - ell * h / sigma)
        assert not guarded.any()
        torch.testing.assert_close(kappa.sum(-1), torch.ones(6, dtype=torch.float64))
        field = mix(kappa, c0, c)
        delta = (ito_increment(-2 * h * field + xi, eps_models, sigma, h) if sde
                 else ode_increment(field, eps_models, divergence, sigma, h))
        torch.testing.assert_close(delta - delta[:, :1], (ell - ell[0]).expand(6, m) * h / sigma)


def test_two_model_closed_form_is_the_papers_formula_and_agrees_with_the_system():
    eps_models, _, z = _random_step(2)
    sigma, h = 2.0, 0.1
    xi = math.sqrt(2 * sigma * h) * z
    A, b = drift_matrix(eps_models, eps_models, -2 * h, sigma), ito_increment(xi, eps_models, sigma, h)
    kappa, _ = and_kappa_two(A, b)
    delta = eps_models[0] - eps_models[1]
    paper = 0.5 + (xi * delta).sum(-1) / (2 * h * delta.square().sum(-1))   # docs/methods/superdiff.md (10)
    torch.testing.assert_close(kappa[:, 0], paper)
    torch.testing.assert_close(and_kappa_system(A, b)[0], kappa)


def test_three_model_system_reduces_to_the_closed_form_when_two_models_coincide():
    eps_models, _, z = _random_step(2)
    sigma, h = 0.8, 0.02
    xi = math.sqrt(2 * sigma * h) * z
    three = torch.stack([eps_models[0], eps_models[1], eps_models[1]])   # models 2 and 3 are the same

    def solve(eps_set, solver):
        A, b = drift_matrix(eps_set, eps_set, -2 * h, sigma), ito_increment(xi, eps_set, sigma, h)
        return solver(A, b)

    kappa_2, _ = solve(eps_models, and_kappa_two)
    kappa_3, guarded = solve(three, and_kappa_system)
    assert guarded.all()                                           # the singular direction was dropped
    torch.testing.assert_close(kappa_3[:, 0], kappa_2[:, 0])
    torch.testing.assert_close(kappa_3[:, 1] + kappa_3[:, 2], kappa_2[:, 1])
    torch.testing.assert_close(kappa_3[:, 1], kappa_3[:, 2])       # minimum norm: an even split


def test_and_guard_splits_evenly_when_the_models_agree():
    eps_models, _, z = _random_step(2)
    same = torch.stack([eps_models[0], eps_models[0] * (1 + 1e-7)])
    A, b = drift_matrix(same, same, -0.2, 1.0), ito_increment(z, same, 1.0, 0.1)
    kappa, guarded = and_kappa_two(A, b)
    assert guarded.all() and torch.equal(kappa, torch.full_like(kappa, 0.5))


# ----- conditions, guidance, one batched call ------------------------------------------------------
class CountingDenoiser(torch.nn.Module):
    """Wraps a denoiser and records the batch size of every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, sigma, **cond):
        self.calls.append(x.shape[0])
        return self.inner(x, sigma, **cond)


@pytest.fixture
def labelled():
    """A class-conditional exact mixture: class 0 on the left, class 1 on the right."""
    return GaussianMixture([[-3.0, 0.0], [-2.0, 2.0], [3.0, 0.0], [2.0, -2.0]], stds=[0.6, 0.5, 0.7, 0.5],
                           labels=[0, 0, 1, 1])


def test_conditions_of_one_model_match_separate_models_in_one_batched_call(labelled):
    counting = CountingDenoiser(labelled)
    conditioned = Components.over_conditions(counting, [{"class_labels": 0}, {"class_labels": 1}])
    class_models = [GaussianMixture(labelled.means[k], stds=labelled.eigvals[k].sqrt()) for k in ([0, 1], [2, 3])]
    for mode in ("or", "and"):
        counting.calls.clear()
        together, _ = _run(conditioned, mode, 50, steps=20)
        apart, _ = _run(class_models, mode, 50, steps=20)
        assert counting.calls == [100] * 20 and together.model_calls == 20     # M·N rows, one call a step
        torch.testing.assert_close(together.x, apart.x)
        torch.testing.assert_close(together.log_q, apart.log_q)


def test_guidance_moves_x_while_the_unguided_conditionals_densities_are_tracked(labelled):
    counting = CountingDenoiser(labelled)
    conds = [{"class_labels": 0}, {"class_labels": 1}]
    guided = Components.over_conditions(counting, conds, w=2.0)
    plain = Components.over_conditions(labelled, conds)
    guided_and, _ = _run(guided, "and", 60, steps=30)
    assert counting.calls == [180] * 30                                     # conditionals + null, one call
    torch.testing.assert_close(guided_and.log_q[:, 0], guided_and.log_q[:, 1], rtol=0, atol=1e-8)
    # the exact mixture's ε̂_u is a convex combination of its classes' ε̂_i, so the guided field stays on
    # the line through ε̂_1, ε̂_2 and AND's equal-density condition picks the same point: guidance cancels
    torch.testing.assert_close(guided_and.x, _run(plain, "and", 60, steps=30)[0].x)
    guided_or, _ = _run(guided, "or", 60, steps=30)
    assert (guided_or.x - _run(plain, "or", 60, steps=30)[0].x).abs().max() > 0.1   # OR: guidance moves x


def test_trajectory_record_and_callback_shapes(labelled):
    seen = []
    result, sigmas = _run([labelled, labelled], "or", 7, steps=5, record=True,
                          callback=lambda i, x, log_q: seen.append(i))
    assert seen == list(range(5))
    t = result.trajectory
    assert t.x.shape == (6, 7, 2) and t.log_q.shape == (6, 7, 2) and t.kappa.shape == (5, 7, 2)
    torch.testing.assert_close(t.x[-1], result.x)
    assert torch.equal(t.log_q[0], torch.zeros(7, 2, dtype=torch.float64))


# ----- errors ------------------------------------------------------------------------------------------
def test_bad_input_is_refused_before_any_work(labelled):
    x = torch.zeros(3, 2, dtype=torch.float64)
    sigmas = get_sigmas("karras", 5, 0.01, 80.0)
    with pytest.raises(UnknownNameError):
        superdiff([labelled], x, sigmas, mode="xor")
    with pytest.raises(SigmaRangeError):
        superdiff([labelled], x, torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]))
    with pytest.raises(ConfigError):
        superdiff([labelled, labelled], x, sigmas, bias=[1.0])
    with pytest.raises(ConfigError):
        superdiff([labelled, labelled], x, sigmas, mode="and", bias=[0.0, -math.inf])
    with pytest.raises(ConfigError):
        Components.over_models([labelled, labelled], conds=[{}])


def test_nan_model_output_stops_with_nonfinite_error(labelled):
    def broken(x, sigma, **cond):
        return torch.full_like(x, float("nan"))

    with pytest.raises(NonFiniteError, match="step 0"):
        superdiff([labelled, broken], torch.zeros(2, 2, dtype=torch.float64), get_sigmas("karras", 4, 0.01, 80.0))
