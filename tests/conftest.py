"""Shared fixtures: small analytic Gaussian mixtures with their parameters kept as plain numpy
arrays, so each test can recompute the closed forms independently (scipy / numpy), and seeded
random generators so every test is deterministic."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from difflab import GaussianMixture


@dataclass
class MixtureCase:
    """A GaussianMixture and, independently, its parameters: means [K, D], full covs [K, D, D],
    normalised weights [K], component labels [K] (−1: none)."""

    model: GaussianMixture
    means: np.ndarray
    covs: np.ndarray
    weights: np.ndarray
    labels: np.ndarray

    @property
    def dim(self) -> int:
        return self.means.shape[1]


def _case(means, full_covs, weights, labels, **kwargs) -> MixtureCase:
    model = GaussianMixture(means, weights=weights, labels=labels, **kwargs)
    weights = np.asarray(weights, dtype=np.float64)
    return MixtureCase(model, np.asarray(means, np.float64), np.asarray(full_covs, np.float64),
                       weights / weights.sum(), np.asarray(labels))


@pytest.fixture
def mix2d() -> MixtureCase:
    """2-D, 3 components, diagonal stds [K, D], unequal weights; labels [0, 1, 1] so that class 1
    is itself a 2-component mixture. Components are > 6 stds apart (for frequency counting)."""
    means = [[-4.0, 0.0], [3.0, 3.0], [2.0, -4.0]]
    stds = [[0.5, 1.0], [0.8, 0.4], [0.6, 0.7]]
    covs = np.stack([np.diag(np.square(s)) for s in stds])
    return _case(means, covs, [0.5, 0.3, 0.2], [0, 1, 1], stds=stds)


@pytest.fixture
def mix1d() -> MixtureCase:
    """1-D, 2 components of different widths and weights."""
    means, stds = [[-1.5], [2.0]], [0.4, 0.9]
    covs = np.square(np.asarray(stds))[:, None, None]
    return _case(means, covs, [0.35, 0.65], [0, 1], stds=stds)


@pytest.fixture
def mixfull() -> MixtureCase:
    """2-D, 2 components with correlated (full) covariances, passed as covs=."""
    means = [[-1.0, 1.0], [1.5, -0.5]]
    covs = np.array([[[1.0, 0.6], [0.6, 0.8]], [[0.5, -0.3], [-0.3, 1.2]]])
    return _case(means, covs, [0.4, 0.6], [-1, -1], covs=covs)


@pytest.fixture
def mixfull3d() -> MixtureCase:
    """3-D, 2 components with dense covariances. (2×2 eigenvector matrices from eigh are symmetric
    reflections, so only D >= 3 can reveal a transposed eigenvector matrix.)"""
    factors = np.array([[[1.0, 0.0, 0.0], [0.7, 0.5, 0.0], [-0.4, 0.3, 0.6]],
                        [[0.6, 0.0, 0.0], [-0.5, 0.9, 0.0], [0.2, 0.8, 0.4]]])
    covs = factors @ factors.transpose(0, 2, 1)
    return _case([[0.0, 1.0, -1.0], [2.0, -1.0, 0.5]], covs, [0.45, 0.55], [-1, -1], covs=covs)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240607)


# ----- independent closed forms (numpy / scipy only; never the code under test) ---------------
def np_log_prob(case: MixtureCase, x: np.ndarray, sigma: float, keep=None) -> np.ndarray:
    """log Σ_k w_k N(x; μ_k, Σ_k + σ²I) with scipy; `keep` restricts to a subset of components."""
    idx = range(len(case.weights)) if keep is None else keep
    w = case.weights[list(idx)] / case.weights[list(idx)].sum()
    terms = [np.log(w_k) + multivariate_normal(case.means[k], case.covs[k] + sigma**2 * np.eye(case.dim)).logpdf(x)
             for w_k, k in zip(w, idx)]
    return logsumexp(np.stack(terms, -1).reshape(len(x), -1), axis=-1)


def np_denoiser(case: MixtureCase, x: np.ndarray, sigma, keep=None) -> np.ndarray:
    """E[x0 | x_σ = x] = Σ_k r_k(x) (μ_k + Σ_k (Σ_k + σ²I)⁻¹ (x − μ_k)), with numpy linear algebra.

    x: [B, D]; sigma: float or [B]."""
    x = np.asarray(x, np.float64)
    sigma = np.broadcast_to(np.asarray(sigma, np.float64), (len(x),))
    idx = list(range(len(case.weights))) if keep is None else list(keep)
    out = np.empty_like(x)
    for b in range(len(x)):
        log_r, x0_k = [], []
        for k in idx:
            cov_marg = case.covs[k] + sigma[b] ** 2 * np.eye(case.dim)
            log_r.append(np.log(case.weights[k]) + multivariate_normal(case.means[k], cov_marg).logpdf(x[b]))
            x0_k.append(case.means[k] + case.covs[k] @ np.linalg.solve(cov_marg, x[b] - case.means[k]))
        r = np.exp(np.array(log_r) - logsumexp(log_r))
        out[b] = r @ np.array(x0_k)
    return out


SINGLE_THREAD_FOLDERS = ("core", "sampling", "compose", "condition", "distill")


@pytest.fixture(scope="module", autouse=True)
def _single_intra_op_thread(request):
    """These folders' tests use tiny tensors, for which intra-op threads only add wake-up cost
    (~12 ms per softmax on a 2-core machine with one busy core, 3000× the op; a 2-D DEFT fit ran 30×
    slower with 2 threads). Module-scoped, so it is in force for module-scoped fixtures (fits) too;
    other folders keep their threads."""
    if request.path.parent.name not in SINGLE_THREAD_FOLDERS:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def quick_demo_dir(tmp_path_factory):
    """`difflab demo --quick` run once per session (every section); tests read its report."""
    from difflab.apps.demo.run import run_demo

    out = tmp_path_factory.mktemp("demo")
    run_demo(out, quick=True, seed=0, device="cpu")
    return out


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """`tiny_pipeline(kind, seed=0, prediction_type="epsilon") -> folder`: a tiny random diffusers pipeline
    (difflab.interop.diffusers.tiny), built once per session and arguments. Shared: copy it before changing it."""
    pytest.importorskip("diffusers")
    from difflab.interop.diffusers.tiny import save_tiny_pipeline

    built: dict[tuple, object] = {}

    def folder(kind: str = "text_to_image", seed: int = 0, prediction_type: str = "epsilon"):
        key = (kind, seed, prediction_type)
        if key not in built:
            root = tmp_path_factory.mktemp(f"{kind}-{seed}-{prediction_type}")
            built[key] = save_tiny_pipeline(root / "pipeline", kind=kind, seed=seed, prediction_type=prediction_type)
        return built[key]
    return folder
