"""Distances between samples: paired mean L2, sliced Wasserstein, MMD, Fréchet distance, exact NLL."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from difflab.core.errors import ShapeError


def mean_l2(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of ‖x_i − reference_i‖₂ (x, reference: [B, ...], paired: the same noise), in float64:
    how far a solver's endpoints are from a reference solution of the same ODE."""
    return float((x.double() - reference.double()).flatten(1).norm(dim=1).mean())


def _as_matrix(samples, name: str, min_rows: int = 1) -> torch.Tensor:
    """[N, ...] tensor or array -> [N, F] float64 CPU tensor (trailing dims flattened)."""
    matrix = samples if isinstance(samples, torch.Tensor) else torch.as_tensor(np.asarray(samples))
    if matrix.dim() < 1 or len(matrix) < min_rows:
        raise ShapeError(
            f"{name} has shape {tuple(matrix.shape)}; expected [N, ...] with N >= {min_rows} samples."
        )
    matrix = matrix.detach().to("cpu", torch.float64).reshape(len(matrix), -1)
    if not torch.isfinite(matrix).all():
        raise ShapeError(f"{name} contains NaN or infinite values; remove or fix those samples first.")
    return matrix


def _as_pair(x, y, min_rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_matrix(x, "x", min_rows), _as_matrix(y, "y", min_rows)
    if x.shape[1] != y.shape[1]:
        raise ShapeError(
            f"x has {x.shape[1]} values per sample and y has {y.shape[1]}; expected the same "
            "per-sample shape (both sets from one space)."
        )
    return x, y


def sliced_wasserstein(x, y, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance (POT), sqrt(E_θ W_2²(θ·x, θ·y)) over random unit θ.

    x: [N, ...], y: [M, ...] tensors or arrays (trailing dims flattened, N may differ from M).
    In 1-D it equals W_2 exactly (θ = ±1).
    """
    import ot

    x, y = _as_pair(x, y)
    return float(ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), n_projections=n_projections,
                                                p=2, seed=seed))


def median_distance(x: torch.Tensor, y: torch.Tensor, max_points: int = 2048) -> float:
    """Median pairwise distance over the pooled samples (at most `max_points` of them, evenly spaced)."""
    pooled = torch.cat([x, y])
    pooled = pooled[torch.linspace(0, len(pooled) - 1, min(len(pooled), max_points)).long()]
    distances = torch.cdist(pooled, pooled)
    off_diagonal = distances[~torch.eye(len(pooled), dtype=torch.bool)]
    return float(off_diagonal.median())


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, bandwidths: list[float], chunk: int = 1024) -> float:
    """Σ_ij Σ_h exp(-‖a_i - b_j‖² / (2h²)), in row blocks so memory stays O(chunk · len(b))."""
    total = 0.0
    for start in range(0, len(a), chunk):
        squared = torch.cdist(a[start:start + chunk], b).square()
        total += sum(float(torch.exp(-squared / (2 * h * h)).sum()) for h in bandwidths)
    return total


def mmd(x, y, bandwidths: list[float] | None = None) -> float:
    """Unbiased squared MMD with the kernel Σ_h exp(-‖a - b‖² / (2h²)) (Gretton et al. 2012, eq. 3).

    x: [N, ...], y: [M, ...] (N, M >= 2). bandwidths: length scales h; default the median pairwise
    distance of the pooled samples times [0.5, 1, 2]. Can be slightly negative when x and y come
    from one distribution (it is unbiased).
    """
    x, y = _as_pair(x, y, min_rows=2)
    if bandwidths is None:
        h_median = median_distance(x, y) or 1.0  # all points equal: any scale gives MMD 0
        bandwidths = [0.5 * h_median, h_median, 2.0 * h_median]
    n, m = len(x), len(y)
    self_terms = len(bandwidths)  # k(a, a) = 1 per kernel: the diagonal left out by the unbiased form
    k_xx = (_kernel_sum(x, x, bandwidths) - n * self_terms) / (n * (n - 1))
    k_yy = (_kernel_sum(y, y, bandwidths) - m * self_terms) / (m * (m - 1))
    k_xy = _kernel_sum(x, y, bandwidths) / (n * m)
    return k_xx + k_yy - 2 * k_xy


def frechet_distance(feat_x, feat_y, eps: float = 1e-6) -> float:
    """‖μx − μy‖² + Tr(Σx + Σy − 2(ΣxΣy)^{1/2}) of Gaussians fitted to two feature sets.

    feat_x: [N, F], feat_y: [M, F] (N, M >= 2), in float64. If ΣxΣy is singular its square root
    is taken of (Σx + eps·I)(Σy + eps·I); a tiny imaginary part from sqrtm is dropped.
    """
    from scipy.linalg import LinAlgWarning, sqrtm
    from threadpoolctl import threadpool_limits

    x, y = _as_pair(feat_x, feat_y, min_rows=2)
    x, y = x.numpy(), y.numpy()
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    cov_x, cov_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    # sqrtm's blocked Schur method makes many small BLAS calls; on a shared 2-core machine two
    # BLAS threads made a 128-d FD take 1.9 s instead of 0.02 s, so it runs on one thread
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("error", LinAlgWarning)  # scipy's "singular matrix" warning
        try:
            cross_sqrt = sqrtm(cov_x @ cov_y)
            singular = not np.isfinite(cross_sqrt).all()
        except LinAlgWarning:
            singular = True
        if singular:  # the offset enters every term, so identical sets still give exactly 0
            cov_x, cov_y = cov_x + eps * np.eye(len(cov_x)), cov_y + eps * np.eye(len(cov_y))
            warnings.simplefilter("ignore", LinAlgWarning)
            cross_sqrt = sqrtm(cov_x @ cov_y)
    trace = np.trace(cov_x) + np.trace(cov_y) - 2.0 * np.trace(np.real(cross_sqrt))
    return float(np.sum((mu_x - mu_y) ** 2) + trace)


def exact_nll(mixture, x: torch.Tensor) -> float:
    """Mean negative log-likelihood of x [N, D] under `mixture` at σ = 0 (nats per sample)."""
    return float(-mixture.log_prob(x, torch.zeros(len(x), dtype=x.dtype, device=x.device)).mean())
