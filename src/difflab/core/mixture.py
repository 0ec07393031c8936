"""The analytic Gaussian mixture: a denoiser with exact answers, the ground truth of every test.

p0 = Σ_k w_k N(μ_k, Σ_k). Under x_σ = x0 + σ·ε the marginal is p_σ = Σ_k w_k N(μ_k, Σ_k + σ²I), so
the score, the denoiser E[x0 | x_σ], the log-density at every σ and, for a linear-Gaussian
measurement, the posterior are all closed form. Each Σ_k is held as its eigendecomposition
U_k diag(λ_k) U_kᵀ, so Σ_k + σ²I = U_k diag(λ_k + σ²) U_kᵀ for any σ at no extra cost; diagonal
and full covariances share one code path. Computation is in float64, results in x's dtype.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from difflab.core.denoiser import sigma_batch
from difflab.core.errors import ShapeError
from difflab.core.serialization import SavedModel


def _as_tensor(v, dtype=torch.float64) -> Tensor:
    return torch.as_tensor(v, dtype=dtype).clone()


class GaussianMixture(SavedModel, nn.Module):
    """Exact Gaussian-mixture model in σ-space; a denoiser D(x, sigma, class_labels=None).

    means: [K, D]; stds: [K] (isotropic) or [K, D] (diagonal); or covs: [K, D, D] (full);
    weights: [K] (normalised here; uniform if None); labels: [K] int class of each component
    (for an exact class-conditional model; label −1 in a query means unconditional);
    data_shape: the per-sample shape (default (D,)); samples are reshaped to it, so an image-shaped
    mixture works with image code.
    """

    def __init__(self, means, stds=None, weights=None, covs=None, labels=None,
                 data_shape: Sequence[int] | None = None):
        super().__init__()
        means = _as_tensor(means)
        if means.ndim != 2:
            raise ShapeError(f"means must be [K, D], got shape {tuple(means.shape)}")
        n_comp, dim = means.shape
        eigvals, eigvecs = self._eigen(n_comp, dim, stds, covs)
        weights = torch.ones(n_comp, dtype=torch.float64) if weights is None else _as_tensor(weights)
        if weights.shape != (n_comp,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ShapeError(f"weights must be [K]=[{n_comp}] non-negative with a positive sum, got {weights}")
        labels = torch.full((n_comp,), -1) if labels is None else torch.as_tensor(labels, dtype=torch.long).clone()
        if labels.shape != (n_comp,):
            raise ShapeError(f"labels must be [K]=[{n_comp}], got shape {tuple(labels.shape)}")
        data_shape = (dim,) if data_shape is None else tuple(int(d) for d in data_shape)
        if math.prod(data_shape) != dim:
            raise ShapeError(f"data_shape {data_shape} has {math.prod(data_shape)} elements, means have D={dim}")
        self.register_buffer("means", means)
        self.register_buffer("eigvals", eigvals)
        self.register_buffer("eigvecs", eigvecs)
        self.register_buffer("log_weights", (weights / weights.sum()).log())
        self.register_buffer("labels", labels)
        self.data_shape = data_shape
        self.sigma_min, self.sigma_max = 0.0, math.inf

    @staticmethod
    def _eigen(n_comp: int, dim: int, stds, covs) -> tuple[Tensor, Tensor]:
        """(λ [K, D], U [K, D, D]) with Σ_k = U_k diag(λ_k) U_kᵀ."""
        if (stds is None) == (covs is None):
            raise ShapeError("give exactly one of stds ([K] or [K, D]) and covs ([K, D, D])")
        if covs is not None:
            covs = _as_tensor(covs)
            if covs.shape != (n_comp, dim, dim):
                raise ShapeError(f"covs must be [K, D, D]=[{n_comp}, {dim}, {dim}], got {tuple(covs.shape)}")
            eigvals, eigvecs = torch.linalg.eigh((covs + covs.transpose(1, 2)) / 2)
            return eigvals.clamp_min(0), eigvecs
        stds = _as_tensor(stds)
        if stds.shape == (n_comp,):
            stds = stds[:, None].expand(n_comp, dim)
        if stds.shape != (n_comp, dim) or bool((stds < 0).any()):
            raise ShapeError(f"stds must be [K] or [K, D]=[{n_comp}, {dim}] and non-negative, got {tuple(stds.shape)}")
        return stds.square().clone(), torch.eye(dim, dtype=torch.float64).expand(n_comp, dim, dim).clone()

    # ----- shapes -------------------------------------------------------------------------
    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def covs(self) -> Tensor:
        """Σ_k: [K, D, D]."""
        return self.eigvecs @ torch.diag_embed(self.eigvals) @ self.eigvecs.transpose(1, 2)

    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()

    def _flat(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.data_shape:
            raise ShapeError(f"x must be [B, {', '.join(map(str, self.data_shape))}] for this mixture, "
                             f"got {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1).double()

    # ----- the exact quantities -----------------------------------------------------------
    def _terms(self, x: Tensor, sigma, class_labels: Tensor | None):
        """Per-component pieces at noise level σ: z = U_kᵀ(x − μ_k), var = λ_k + σ², log r_k.

        Returns z [B, K, D], var [B, K, D], log_joint [B, K] = log w_k + log N(x; μ_k, Σ_k + σ²I).
        """
        x_flat = self._flat(x)
        sigma = sigma_batch(sigma, x).double()
        z = torch.einsum("kde,bkd->bke", self.eigvecs, x_flat[:, None, :] - self.means)
        var = self.eigvals + sigma[:, None, None] ** 2
        log_normal = -0.5 * (z.square() / var + (2 * math.pi * var).log()).sum(-1)
        return z, var, log_normal + self._log_prior(class_labels, x.shape[0])

    def _log_prior(self, class_labels: Tensor | None, batch: int) -> Tensor:
        """log w_k, restricted to the components of each query's class (label −1: all). [B, K]."""
        log_w = self.log_weights.expand(batch, -1)
        if class_labels is None:
            return log_w
        class_labels = class_labels.to(self.labels.device).reshape(batch, 1)
        keep = (class_labels < 0) | (self.labels == class_labels)
        if not bool(keep.any(1).all()):
            raise ShapeError(f"class label(s) {class_labels[~keep.any(1)].flatten().tolist()} have no component; "
                             f"component labels are {self.labels.tolist()}")
        log_w = log_w.masked_fill(~keep, -math.inf)
        return log_w - log_w.logsumexp(1, keepdim=True)

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0, class_labels: Tensor | None = None) -> Tensor:
        """Exact log p_σ(x) = log Σ_k w_k N(x; μ_k, Σ_k + σ²I). x: [B, ...] -> [B]."""
        return self._terms(x, sigma, class_labels)[2].logsumexp(1).to(x.dtype)

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Exact D(x; σ) = E[x0 | x_σ = x] = Σ_k r_k (μ_k + Σ_k (Σ_k + σ²I)⁻¹ (x − μ_k))."""
        z, var, log_joint = self._terms(x, sigma, class_labels)
        resp = log_joint.softmax(1)
        x0_per_comp = self.means + torch.einsum("kde,bke->bkd", self.eigvecs, self.eigvals / var * z)
        return torch.einsum("bk,bkd->bd", resp, x0_per_comp).reshape(x.shape).to(x.dtype)

    def score(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """Exact ∇_x log p_σ(x) = −Σ_k r_k (Σ_k + σ²I)⁻¹ (x − μ_k). x: [B, ...] -> [B, ...]."""
        z, var, log_joint = self._terms(x, sigma, class_labels)
        resp = log_joint.softmax(1)
        score_per_comp = -torch.einsum("kde,bke->bkd", self.eigvecs, z / var)
        return torch.einsum("bk,bkd->bd", resp, score_per_comp).reshape(x.shape).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None,
               class_labels: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """n exact samples of p0 (σ = 0): [n, *data_shape]. Optionally one class label per sample."""
        log_w = self._log_prior(class_labels, n) if class_labels is not None else self.log_weights.expand(n, -1)
        comp = torch.multinomial(log_w.exp(), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x0 = self.means[comp] + torch.einsum("nde,ne->nd", self.eigvecs[comp], self.eigvals[comp].sqrt() * z)
        return x0.reshape(n, *self.data_shape).to(dtype)

    def posterior(self, A: Tensor, y: Tensor, sigma_y: float) -> "GaussianMixture":
        """Exact p(x0 | y) for y = A x0 + σ_y·n, n ~ N(0, I): again a mixture (full covariances).

        A: [M, D]; y: [M]. Per component, with S_k = A Σ_k Aᵀ + σ_y² I (Woodbury form, valid for
        singular Σ_k): μ'_k = μ_k + Σ_k Aᵀ S_k⁻¹ (y − A μ_k), Σ'_k = Σ_k − Σ_k Aᵀ S_k⁻¹ A Σ_k,
        w'_k ∝ w_k N(y; A μ_k, S_k).
        """
        A, y = _as_tensor(A), _as_tensor(y).flatten()
        if A.ndim != 2 or A.shape[1] != self.dim or y.shape != (A.shape[0],):
            raise ShapeError(f"need A [M, D={self.dim}] and y [M]; got A {tuple(A.shape)}, y {tuple(y.shape)}")
        covs = self.covs
        cov_AT = covs @ A.T                                                    # Σ_k Aᵀ   [K, D, M]
        S = A @ cov_AT + sigma_y**2 * torch.eye(A.shape[0], dtype=torch.float64)
        residual = y - self.means @ A.T                                        # y − A μ_k [K, M]
        gain = torch.linalg.solve(S, cov_AT.transpose(1, 2)).transpose(1, 2)   # Σ_k Aᵀ S⁻¹ [K, D, M]
        means = self.means + torch.einsum("kdm,km->kd", gain, residual)
        post_covs = covs - gain @ cov_AT.transpose(1, 2)
        log_evidence = torch.distributions.MultivariateNormal(torch.zeros_like(residual), S).log_prob(residual)
        return GaussianMixture(means, covs=post_covs, weights=(self.log_weights + log_evidence).softmax(0),
                               labels=self.labels, data_shape=self.data_shape)

    # ----- models on disk -----------------------------------------------------------------
    def config(self) -> dict:
        return {"class": "GaussianMixture", "kind": "denoiser", "convention": "exact",
                "data_shape": list(self.data_shape), "num_components": self.num_components,
                "num_classes": int(self.labels.max()) + 1 if bool((self.labels >= 0).any()) else 0}

    def tensors(self) -> dict[str, Tensor]:
        return {"means": self.means, "covs": self.covs, "weights": self.weights, "labels": self.labels}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], config: dict) -> "GaussianMixture":
        return cls(tensors["means"], covs=tensors["covs"], weights=tensors["weights"],
                   labels=tensors["labels"], data_shape=config["data_shape"])
