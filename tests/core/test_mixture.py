"""GaussianMixture against independently computed closed forms (scipy / numpy), brute-force
numerical integration and Monte-Carlo estimates."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from difflab import GaussianMixture
from difflab.core.errors import ShapeError
from tests.conftest import MixtureCase, np_denoiser, np_log_prob

CASES = ["mix1d", "mix2d", "mixfull", "mixfull3d"]


def _query_points(case: MixtureCase, rng: np.random.Generator, n: int = 12) -> np.ndarray:
    """Points spread over and between the components (where responsibilities are mixed)."""
    centre, spread = case.means.mean(0), case.means.std(0) + 1.0
    return centre + spread * rng.standard_normal((n, case.dim))


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def _scipy_score_fd(case: MixtureCase, x: np.ndarray, sigma: float, h: float = 1e-5) -> np.ndarray:
    """∇ log p_σ by central differences of scipy's log-density (independent of the code under test)."""
    grad = np.empty_like(x)
    for d in range(case.dim):
        step = np.zeros(case.dim)
        step[d] = h
        grad[:, d] = (np_log_prob(case, x + step, sigma) - np_log_prob(case, x - step, sigma)) / (2 * h)
    return grad


def _sample_p0_numpy(case: MixtureCase, n: int, rng: np.random.Generator) -> np.ndarray:
    """Exact samples of p0 drawn with numpy (not GaussianMixture.sample)."""
    comp = rng.choice(len(case.weights), size=n, p=case.weights)
    chol = np.linalg.cholesky(case.covs)
    return case.means[comp] + np.einsum("nde,ne->nd", chol[comp], rng.standard_normal((n, case.dim)))


# ----- densities and scores --------------------------------------------------------------------
@pytest.mark.parametrize("case_name", CASES)
@pytest.mark.parametrize("sigma", [0.0, 0.05, 0.7, 3.0])
def test_log_prob_equals_scipy_marginal_with_covariance_plus_sigma2(case_name, sigma, request, rng):
    case = request.getfixturevalue(case_name)
    x = _query_points(case, rng)
    got = case.model.log_prob(_t(x), sigma).numpy()
    # float64 round-off only; a missing σ² (or σ instead of σ²) changes log p by > 1e-3 here
    np.testing.assert_allclose(got, np_log_prob(case, x, sigma), rtol=0, atol=1e-10)


@pytest.mark.parametrize("case_name", CASES)
@pytest.mark.parametrize("sigma", [0.0, 0.3, 2.0])
def test_score_is_autograd_gradient_of_log_prob(case_name, sigma, request, rng):
    case = request.getfixturevalue(case_name)
    x = _t(_query_points(case, rng)).requires_grad_(True)
    (grad,) = torch.autograd.grad(case.model.log_prob(x, sigma).sum(), x)
    # both are exact float64 expressions of the same function: agreement to round-off
    torch.testing.assert_close(case.model.score(x.detach(), sigma), grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case_name", CASES)
@pytest.mark.parametrize("sigma", [0.2, 1.0, 3.0])
def test_denoiser_satisfies_tweedie_with_scipy_score(case_name, sigma, request, rng):
    """D(x; σ) = x + σ²·∇ log p_σ(x), the gradient taken numerically from scipy's density."""
    case = request.getfixturevalue(case_name)
    x = _query_points(case, rng)
    fd_score = _scipy_score_fd(case, x, sigma)
    got_d = case.model(_t(x), _t(np.full(len(x), sigma))).numpy()
    got_score = case.model.score(_t(x), sigma).numpy()
    # central differences with h=1e-5: truncation h²/6·|f'''| < 1e-6 for these widths, round-off ~1e-10
    np.testing.assert_allclose(got_score, fd_score, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_d, x + sigma**2 * fd_score, rtol=0, atol=1e-5 * sigma**2)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 1.0, 4.0])
def test_denoiser_is_posterior_mean_by_grid_integration_1d(mix1d, sigma):
    """E[x0 | x_σ = x] = ∫ x0 p0(x0) N(x; x0, σ²) dx0 / ∫ p0(x0) N(x; x0, σ²) dx0 on a fine grid."""
    case = mix1d
    grid = np.linspace(-12, 12, 48001)  # h = 5e-4: >= 100 points per std of the narrowest integrand
    log_p0 = np_log_prob(case, grid[:, None], 0.0)
    x = np.array([-3.0, -1.5, 0.0, 0.3, 1.0, 2.0, 4.5])
    log_joint = log_p0[None, :] - 0.5 * ((x[:, None] - grid[None, :]) / sigma) ** 2
    weights = np.exp(log_joint - log_joint.max(1, keepdims=True))
    expected = (weights * grid).sum(1) / weights.sum(1)
    got = case.model(_t(x[:, None]), _t(np.full(len(x), sigma))).numpy()[:, 0]
    # trapezoid rule on smooth, Gaussian-tailed integrands is spectrally accurate: error << 1e-9
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_denoiser_is_posterior_mean_by_importance_sampling_2d(mix2d, sigma, rng):
    """Self-normalised importance estimate of E[x0 | x_σ]: x0 ~ p0 (numpy), weights N(x; x0, σ²I)."""
    case = mix2d
    x0 = _sample_p0_numpy(case, 400_000, rng)
    for x in np.array([[0.0, 0.0], [2.0, 1.0], [-3.0, 1.0], [2.5, -2.0]]):
        log_w = -0.5 * ((x - x0) ** 2).sum(1) / sigma**2
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
        estimate = w @ x0
        std_err = np.sqrt(w**2 @ (x0 - estimate) ** 2)  # delta-method s.e. of a self-normalised estimate
        assert (std_err < 0.03).all(), "too few effective samples for the test to have power"
        got = case.model(_t(x[None]), _t([sigma])).numpy()[0]
        # 5 standard errors: a chance failure has probability < 1e-5 per coordinate (and it is seeded)
        assert (np.abs(got - estimate) < 5 * std_err).all(), (x, got, estimate, std_err)


def test_full_covariance_denoiser_is_posterior_mean_by_grid_integration_2d(mixfull):
    case, sigma = mixfull, 0.5
    axis = np.linspace(-8, 8, 401)  # h = 0.04, the integrand's narrowest width is ~0.3
    gx, gy = np.meshgrid(axis, axis, indexing="ij")
    grid = np.stack([gx.ravel(), gy.ravel()], 1)
    log_p0 = np_log_prob(case, grid, 0.0)
    for x in np.array([[0.0, 0.0], [-1.0, 2.0], [2.0, -1.5]]):
        log_joint = log_p0 - 0.5 * ((grid - x) ** 2).sum(1) / sigma**2
        w = np.exp(log_joint - log_joint.max())
        expected = w @ grid / w.sum()
        got = case.model(_t(x[None]), _t([sigma])).numpy()[0]
        # Riemann sum of a smooth Gaussian-tailed integrand: error far below 1e-8
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("case_name", CASES)
@pytest.mark.parametrize("sigma", [0.1, 1.0, 5.0])
def test_denoiser_equals_numpy_closed_form_with_per_sample_sigma(case_name, sigma, request, rng):
    case = request.getfixturevalue(case_name)
    x = _query_points(case, rng)
    sigmas = sigma * np.linspace(0.5, 2.0, len(x))  # a different σ in each row
    got = case.model(_t(x), _t(sigmas)).numpy()
    np.testing.assert_allclose(got, np_denoiser(case, x, sigmas), rtol=0, atol=1e-11)  # float64 round-off


@pytest.mark.parametrize("case_name", ["mixfull", "mixfull3d"])
def test_full_covariance_model_returns_the_given_covariances(case_name, request):
    case = request.getfixturevalue(case_name)
    # Σ rebuilt from its eigendecomposition: float64 round-off
    np.testing.assert_allclose(case.model.covs.numpy(), case.covs, rtol=0, atol=1e-13)
    np.testing.assert_allclose(case.model.weights.numpy(), case.weights, rtol=1e-13)


# ----- class conditioning ----------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.0, 0.5, 2.0])
def test_class_conditional_queries_give_the_conditional_mixture(mix2d, sigma, rng):
    """Label 0 -> component 0 only; label 1 -> components {1, 2} renormalised; label −1 -> all."""
    case = mix2d
    x = _query_points(case, rng, n=9)
    labels = np.array([0, 1, -1] * 3)
    keep = {0: [0], 1: [1, 2], -1: [0, 1, 2]}
    expected_lp = np.array([np_log_prob(case, x[i:i + 1], sigma, keep[c])[0] for i, c in enumerate(labels)])
    got_lp = case.model.log_prob(_t(x), sigma, class_labels=torch.as_tensor(labels)).numpy()
    np.testing.assert_allclose(got_lp, expected_lp, rtol=0, atol=1e-10)  # float64 round-off
    if sigma > 0:
        expected_d = np.concatenate([np_denoiser(case, x[i:i + 1], sigma, keep[c]) for i, c in enumerate(labels)])
        got_d = case.model(_t(x), _t(np.full(len(x), sigma)), class_labels=torch.as_tensor(labels)).numpy()
        np.testing.assert_allclose(got_d, expected_d, rtol=0, atol=1e-11)


def test_unknown_class_label_raises_shape_error(mix2d):
    with pytest.raises(ShapeError, match="no component"):
        mix2d.model(torch.zeros(2, 2, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                    class_labels=torch.tensor([1, 7]))


# ----- sampling --------------------------------------------------------------------------------
def _classify(case: MixtureCase, x: np.ndarray) -> np.ndarray:
    """Bayes classifier at σ = 0 (components are > 6 stds apart: misclassification < 1e-8)."""
    log_joint = np.stack([np.log(w) + multivariate_normal(m, c).logpdf(x)
                          for w, m, c in zip(case.weights, case.means, case.covs)], 1)
    return log_joint.argmax(1)


def test_sample_mean_covariance_and_component_frequencies_match_the_mixture(mix2d, generator):
    case, n = mix2d, 200_000
    x = case.model.sample(n, generator=generator, dtype=torch.float64).numpy()
    assert x.shape == (n, 2)
    mean = case.weights @ case.means
    second = np.einsum("k,kde->de", case.weights, case.covs + np.einsum("kd,ke->kde", case.means, case.means))
    cov = second - np.outer(mean, mean)
    # 5 standard errors of the sample mean (s.e. = sqrt(var/n) ~ 0.008 here)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * np.sqrt(np.diag(cov) / n))
    centred = x - x.mean(0)
    products = np.einsum("nd,ne->nde", centred, centred)
    cov_se = products.std(0) / np.sqrt(n)  # s.e. of each sample-covariance entry
    np.testing.assert_array_less(np.abs(products.mean(0) - cov), 5 * cov_se)
    freq = np.bincount(_classify(case, x), minlength=3) / n
    # 5 binomial standard errors sqrt(p(1−p)/n) ~ 0.005; swapped weights would be off by >= 0.1
    np.testing.assert_array_less(np.abs(freq - case.weights), 5 * np.sqrt(case.weights * (1 - case.weights) / n))


def test_class_conditional_sample_draws_only_that_class_in_proportion(mix2d, generator):
    case, n = mix2d, 50_000
    x = case.model.sample(n, generator=generator, class_labels=torch.ones(n, dtype=torch.long),
                          dtype=torch.float64).numpy()
    freq = np.bincount(_classify(case, x), minlength=3) / n
    assert freq[0] == 0  # class 0's component is never drawn
    p = case.weights[1] / (case.weights[1] + case.weights[2])  # = 0.6
    assert abs(freq[1] - p) < 5 * np.sqrt(p * (1 - p) / n)  # 5 binomial s.e. ~ 0.011


@pytest.mark.parametrize("case_name", ["mixfull", "mixfull3d"])
def test_full_covariance_sample_covariance_matches(case_name, request, generator):
    case, n = request.getfixturevalue(case_name), 200_000
    x = case.model.sample(n, generator=generator, dtype=torch.float64).numpy()
    mean = case.weights @ case.means
    second = np.einsum("k,kde->de", case.weights, case.covs + np.einsum("kd,ke->kde", case.means, case.means))
    centred = x - x.mean(0)
    products = np.einsum("nd,ne->nde", centred, centred)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * x.std(0) / np.sqrt(n))  # 5 s.e.
    # 5 s.e.: an eigenvector mix-up (transposed U) would change the off-diagonal by > 0.1
    np.testing.assert_array_less(np.abs(products.mean(0) - (second - np.outer(mean, mean))),
                                 5 * products.std(0) / np.sqrt(n))


# ----- image-shaped mixtures -------------------------------------------------------------------
def test_image_shaped_mixture_reshapes_and_matches_flat_closed_form(rng, generator):
    means = rng.standard_normal((2, 4)) * 2
    stds = rng.uniform(0.3, 1.0, (2, 4))
    weights = np.array([0.3, 0.7])
    model = GaussianMixture(means, stds=stds, weights=weights, data_shape=(1, 2, 2))
    case = MixtureCase(model, means, np.stack([np.diag(s**2) for s in stds]), weights, np.array([-1, -1]))
    x_flat = rng.standard_normal((5, 4)) * 2
    x_img = _t(x_flat).reshape(5, 1, 2, 2)
    d = model(x_img, _t(np.full(5, 0.8)))
    assert d.shape == (5, 1, 2, 2)
    np.testing.assert_allclose(d.reshape(5, 4).numpy(), np_denoiser(case, x_flat, 0.8), rtol=0, atol=1e-11)
    np.testing.assert_allclose(model.log_prob(x_img, 0.8).numpy(), np_log_prob(case, x_flat, 0.8), rtol=0, atol=1e-10)
    assert model.score(x_img, 0.8).shape == (5, 1, 2, 2)
    samples = model.sample(20_000, generator=generator, dtype=torch.float64)
    assert samples.shape == (20_000, 1, 2, 2)
    mean, var = weights @ means, weights @ (stds**2 + means**2) - (weights @ means) ** 2
    # 5 s.e. of the mean, per pixel, in row-major order of (1, 2, 2)
    np.testing.assert_array_less(np.abs(samples.reshape(-1, 4).mean(0).numpy() - mean), 5 * np.sqrt(var / 20_000))
    with pytest.raises(ShapeError, match=r"\[B, 1, 2, 2\]"):
        model(_t(x_flat), _t(np.full(5, 0.8)))


# ----- bad inputs ------------------------------------------------------------------------------
GOOD = dict(means=[[0.0, 0.0], [1.0, 1.0]], stds=[1.0, 2.0])


@pytest.mark.parametrize("kwargs", [
    dict(means=[0.0, 1.0], stds=[1.0, 1.0]),                              # means not [K, D]
    dict(GOOD, stds=[1.0, 2.0, 3.0]),                                     # stds neither [K] nor [K, D]
    dict(GOOD, stds=[[1.0, 1.0], [1.0, -0.1]]),                           # negative std
    dict(GOOD, covs=np.stack([np.eye(2)] * 2)),                           # both stds and covs
    dict(means=GOOD["means"]),                                            # neither
    dict(means=GOOD["means"], covs=np.stack([np.eye(3)] * 2)),            # covs not [K, D, D]
    dict(GOOD, weights=[1.0, 1.0, 1.0]),                                  # weights not [K]
    dict(GOOD, weights=[1.0, -0.5]),                                      # negative weight
    dict(GOOD, weights=[0.0, 0.0]),                                       # zero total weight
    dict(GOOD, labels=[0, 1, 2]),                                         # labels not [K]
    dict(GOOD, data_shape=(1, 3)),                                        # 3 elements, D = 2
], ids=["means-1d", "stds-shape", "stds-negative", "stds-and-covs", "no-stds-no-covs", "covs-shape",
        "weights-shape", "weights-negative", "weights-zero-sum", "labels-shape", "data-shape"])
def test_bad_constructor_arguments_raise_shape_error(kwargs):
    with pytest.raises(ShapeError):
        GaussianMixture(**kwargs)


def test_bad_query_shapes_raise_shape_error(mix2d):
    model = mix2d.model
    with pytest.raises(ShapeError, match=r"\[B, 2\]"):
        model(torch.zeros(3, 3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ShapeError, match="sigma"):
        model(torch.zeros(3, 2, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ShapeError):
        model.posterior(torch.ones(1, 3), torch.ones(1), 0.1)            # A has D=3 columns
    with pytest.raises(ShapeError):
        model.posterior(torch.ones(2, 2), torch.ones(3), 0.1)            # y does not match A's rows


# ----- the exact posterior for y = A x0 + σ_y n ------------------------------------------------
def _brute_force_log_posterior(case: MixtureCase, grid: np.ndarray, cell: float, A, y, sigma_y) -> np.ndarray:
    """log p0(x) + log N(y; A x, σ_y² I), normalised by a Riemann sum over the grid."""
    log_lik = multivariate_normal(np.zeros(len(y)), sigma_y**2 * np.eye(len(y))).logpdf(grid @ A.T - y)
    log_unnorm = np_log_prob(case, grid, 0.0) + np.atleast_1d(log_lik)
    return log_unnorm - (logsumexp(log_unnorm) + np.log(cell))


def _posterior_error_on_grid(case, grid, cell, A, y, sigma_y, rng) -> float:
    """Max |log p(x0|y) − brute force| over 60 grid points where the posterior has its mass."""
    expected = _brute_force_log_posterior(case, grid, cell, A, y, sigma_y)
    bulk = np.flatnonzero(expected > expected.max() - 12)
    pick = rng.choice(bulk, size=min(60, len(bulk)), replace=False)
    post = case.model.posterior(_t(A), _t(y), sigma_y)
    got = post.log_prob(_t(grid[pick]), 0.0).numpy()
    return float(np.abs(got - expected[pick]).max())


# every posterior std spans >= 5 grid cells; Riemann sums of Gaussians then err by ~exp(−2π²·25) << 1e-8
GRID_TOL = 1e-8


def test_posterior_log_prob_matches_grid_normalised_prior_times_likelihood_1d(mix1d, rng):
    grid = np.linspace(-12, 12, 24001)[:, None]
    A, y = np.array([[0.8]]), np.array([1.2])
    assert _posterior_error_on_grid(mix1d, grid, 1e-3, A, y, 0.5, rng) < GRID_TOL


def _grid_2d(lo, hi, n):
    axis = np.linspace(lo, hi, n)
    gx, gy = np.meshgrid(axis, axis, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], 1), (axis[1] - axis[0]) ** 2


def test_posterior_observing_one_coordinate_matches_2d_grid(mix2d, rng):
    grid, cell = _grid_2d(-11, 10, 451)  # h = 0.047; narrowest posterior std ~ 0.25
    A, y = np.array([[1.0, 0.0]]), np.array([2.3])
    assert _posterior_error_on_grid(mix2d, grid, cell, A, y, 0.3, rng) < GRID_TOL


def test_posterior_with_full_2x2_operator_matches_2d_grid(mixfull, rng):
    grid, cell = _grid_2d(-8, 8, 401)  # h = 0.04; narrowest posterior std ~ 0.3
    A, y = np.array([[1.0, 0.5], [-0.3, 0.8]]), np.array([0.7, -0.4])
    assert _posterior_error_on_grid(mixfull, grid, cell, A, y, 0.5, rng) < GRID_TOL


def test_posterior_weights_shift_to_the_component_that_explains_y(mix2d):
    case, sigma_y = mix2d, 0.3
    A, y = np.array([[1.0, 0.0]]), np.array([1.8])  # x-coordinate 1.8: best explained by component 2 (x = 2)
    post = case.model.posterior(_t(A), _t(y), sigma_y)
    evidence = np.array([multivariate_normal(A @ m, A @ c @ A.T + sigma_y**2 * np.eye(1)).pdf(y)
                         for m, c in zip(case.means, case.covs)])
    expected = case.weights * evidence / (case.weights * evidence).sum()
    np.testing.assert_allclose(post.weights.numpy(), expected, rtol=1e-10)  # float64 round-off
    # the prior favours component 0 (w = 0.5); the posterior favours 2 (prior w = 0.2), more than 3-fold up
    assert case.weights.argmax() == 0 and post.weights.argmax() == 2 and post.weights[2] > 3 * case.weights[2]
    assert post.weights[0] < 1e-12  # component 0 (x = −4) cannot have produced y = 1.8
