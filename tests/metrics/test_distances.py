"""difflab.metrics.distances against closed forms and independent recomputations."""

import math

import numpy as np
import pytest
import torch

from difflab.core.errors import ShapeError
from difflab.metrics import exact_nll, frechet_distance, mean_l2, mmd, sliced_wasserstein
from tests.conftest import np_log_prob

# ----- paired mean L2 ------------------------------------------------------------------------


def test_mean_l2_is_the_mean_of_per_sample_euclidean_norms_over_every_pixel():
    """Two [2, 1, 2, 2] images: sample 0 differs by a (3, 4, 0, 0) image (norm 5), sample 1 by (1, 1, 1, 1)
    (norm 2), so the mean is 3.5 exactly; a per-pixel mean or an unflattened norm would give another number."""
    reference = torch.zeros(2, 1, 2, 2, dtype=torch.float32)
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]).reshape(2, 1, 2, 2)
    assert mean_l2(x, reference) == 3.5
    assert mean_l2(reference, x) == 3.5


# ----- sliced Wasserstein -------------------------------------------------------------------


def test_sliced_wasserstein_of_identical_sets_is_zero():
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein(x, x.clone()) == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_in_1d_is_the_shift(rng):
    # in 1-D, SW_2 = W_2 (every direction is ±1, so 8 projections suffice) and
    # W_2(N(0,1), N(a,1)) = |a|; with 20,000 independent samples each the empirical W_2 is off by
    # ~0.01 (seen: 1.48–1.50 over seeds); 0.04 fails if a factor or a square root is wrong
    a = 1.5
    x, y = rng.standard_normal((20_000, 1)), rng.standard_normal((20_000, 1)) + a
    assert sliced_wasserstein(x, y, n_projections=8) == pytest.approx(a, abs=0.04)
    assert sliced_wasserstein(x, y - 2 * a, n_projections=8) == pytest.approx(a, abs=0.04)


def test_sliced_wasserstein_of_a_translate_is_shift_over_sqrt_dim(rng):
    # projecting a translate by a·e1 on θ moves it by a·θ1, so SW_2² = a² E[θ1²] = a²/d;
    # 1,024 random directions estimate E[θ1²] = 1/2 to ~2% (relative), so SW to ~1%: 4% tolerance
    a, x = 2.0, rng.standard_normal((400, 2))
    y = x + np.array([a, 0.0])
    assert sliced_wasserstein(x, y, n_projections=1024) == pytest.approx(a / math.sqrt(2), rel=0.04)


def test_sliced_wasserstein_flattens_images_and_is_seeded():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 4, 4, generator=g), torch.randn(80, 1, 4, 4, generator=g)
    assert sliced_wasserstein(x, y, seed=3) == sliced_wasserstein(x.reshape(64, -1), y.reshape(80, -1), seed=3)


def test_sliced_wasserstein_rejects_different_dimensions():
    with pytest.raises(ShapeError, match="3 values per sample and y has 2"):
        sliced_wasserstein(torch.zeros(5, 3), torch.zeros(5, 2))


# ----- MMD ----------------------------------------------------------------------------------

def _mmd_by_loops(x: np.ndarray, y: np.ndarray, bandwidths) -> float:
    """The unbiased MMD² estimator written out pair by pair (Gretton et al. 2012, eq. 3)."""
    def k(a, b):
        return sum(math.exp(-np.sum((a - b) ** 2) / (2 * h * h)) for h in bandwidths)
    n, m = len(x), len(y)
    k_xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    k_yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    k_xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return k_xx + k_yy - 2 * k_xy


def test_mmd_matches_the_pairwise_definition(rng):
    x, y = rng.standard_normal((12, 2)), rng.standard_normal((9, 2)) + 0.7
    expected = _mmd_by_loops(x, y, [0.5, 1.3])
    assert mmd(x, y, bandwidths=[0.5, 1.3]) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_mmd_default_bandwidths_are_the_median_heuristic(rng):
    x, y = rng.standard_normal((30, 3)), rng.standard_normal((25, 3))
    pooled = np.concatenate([x, y])
    distances = np.linalg.norm(pooled[:, None] - pooled[None], axis=-1)
    h = np.median(distances[~np.eye(len(pooled), dtype=bool)])
    # torch.median takes the lower middle value of an even count, numpy averages the two: tiny gap
    assert mmd(x, y) == pytest.approx(_mmd_by_loops(x, y, [0.5 * h, h, 2 * h]), rel=1e-3)


def test_mmd_is_near_zero_for_one_distribution_and_positive_for_two():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g)
    # null standard deviation at n = 500 is ~0.004 (seen over seeds); 0.02 is 5 of them
    assert abs(mmd(x, y)) < 0.02
    assert mmd(x, y + 1.0) > 0.2  # a unit shift gives ~0.4


def test_mmd_needs_two_samples_per_set():
    with pytest.raises(ShapeError, match="N >= 2"):
        mmd(torch.zeros(1, 2), torch.zeros(5, 2))


# ----- Fréchet distance ---------------------------------------------------------------------

def _with_exact_moments(rng, mean: np.ndarray, cov: np.ndarray, n: int) -> np.ndarray:
    """n points whose sample mean and (n−1)-normalised covariance are exactly mean and cov."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten exactly
    return mean + z @ np.linalg.cholesky(cov).T


def _np_sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T


def test_frechet_distance_diagonal_closed_form(rng):
    # diagonal covariances: Tr(Σx + Σy − 2(ΣxΣy)^½) = Σ_i (s_x,i − s_y,i)²
    mean_x, mean_y = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    std_x, std_y = np.array([1.0, 2.0, 0.5]), np.array([3.0, 1.0, 0.5])
    x = _with_exact_moments(rng, mean_x, np.diag(std_x**2), 200)
    y = _with_exact_moments(rng, mean_y, np.diag(std_y**2), 300)
    expected = np.sum((mean_x - mean_y) ** 2) + np.sum((std_x - std_y) ** 2)  # 4.25 + 5
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_full_covariance_closed_form(rng):
    # Tr (ΣxΣy)^½ = Tr (Σx^½ Σy Σx^½)^½ (same eigenvalues), computed here with eigh only
    cov_x = np.array([[2.0, 0.8, 0.0], [0.8, 1.0, 0.3], [0.0, 0.3, 0.5]])
    cov_y = np.array([[1.0, -0.4, 0.2], [-0.4, 1.5, 0.0], [0.2, 0.0, 0.7]])
    mean_x, mean_y = np.zeros(3), np.array([1.0, -1.0, 0.5])
    root_x = _np_sqrt_psd(cov_x)
    expected = (np.sum((mean_x - mean_y) ** 2) + np.trace(cov_x) + np.trace(cov_y)
                - 2 * np.trace(_np_sqrt_psd(root_x @ cov_y @ root_x)))
    x = _with_exact_moments(rng, mean_x, cov_x, 100)
    y = _with_exact_moments(rng, mean_y, cov_y, 100)
    assert frechet_distance(torch.as_tensor(x), torch.as_tensor(y)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_from_many_gaussian_samples(rng):
    # FD(N(0, I), N(μ, 4I)) in 4-D = ‖μ‖² + 4·(2 − 1)² = 4 + 4; with 50,000 samples each the sample
    # moments are off by ~0.01 relative, so 3% is loose enough and tight against a factor error
    x = rng.standard_normal((50_000, 4))
    y = 2 * rng.standard_normal((50_000, 4)) + 1.0
    assert frechet_distance(x, y) == pytest.approx(8.0, rel=0.03)


def test_frechet_distance_of_identical_sets_is_zero_even_when_singular():
    x = torch.randn(50, 100, generator=torch.Generator().manual_seed(0))  # rank-49 covariance
    assert abs(frechet_distance(x, x)) < 1e-4
    assert frechet_distance(torch.zeros(10, 3), torch.zeros(10, 3)) == 0.0


# ----- exact NLL ----------------------------------------------------------------------------

class _Gaussian1d:
    """A stand-in model with the mixture's log_prob(x, sigma) contract: N(mean, std² + σ²)."""

    def __init__(self, mean: float, std: float):
        self.mean, self.std, self.sigmas_seen = mean, std, None

    def log_prob(self, x, sigma):
        self.sigmas_seen = sigma
        var = self.std**2 + torch.as_tensor(sigma) ** 2
        return -0.5 * (torch.log(2 * math.pi * var) + (x[:, 0] - self.mean) ** 2 / var)


def test_exact_nll_of_a_1d_gaussian_by_hand():
    model = _Gaussian1d(mean=1.0, std=2.0)
    x = torch.tensor([[1.0], [3.0], [-1.0]], dtype=torch.float64)
    # by hand: ½log(2π·4) + mean((x−1)²)/(2·4) = ½log(8π) + (0 + 4 + 4)/3/8
    expected = 0.5 * math.log(8 * math.pi) + 1 / 3
    assert exact_nll(model, x) == pytest.approx(expected, rel=1e-12)
    assert torch.equal(model.sigmas_seen, torch.zeros(3, dtype=torch.float64))  # σ = 0 per sample


def test_exact_nll_of_the_mixture_matches_scipy(mix1d, rng):
    x = rng.normal(0.0, 2.0, size=(200, 1))
    expected = -np_log_prob(mix1d, x, 0.0).mean()
    assert exact_nll(mix1d.model, torch.as_tensor(x)) == pytest.approx(expected, rel=1e-10)
