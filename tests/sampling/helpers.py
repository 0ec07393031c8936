"""Shared pieces of the sampling tests: a call-counting denoiser, a numpy mixture denoiser and the
high-accuracy reference solution of the probability-flow ODE (scipy's DOP853)."""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp
from scipy.special import logsumexp


def as_f64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


class CountingDenoiser(torch.nn.Module):
    """Wraps a denoiser and counts its calls (the NFE a solver really spends)."""

    def __init__(self, base):
        super().__init__()
        self.base, self.calls = base, 0
        self.data_shape = getattr(base, "data_shape", None)

    def forward(self, x, sigma, **cond):
        self.calls += 1
        return self.base(x, sigma, **cond)


def np_denoiser_vectorised(case, x, sigma):
    """E[x0 | x_σ] for the mixture, vectorised over the batch (numpy only), for the ODE reference."""
    log_r, x0_k = [], []
    for mean, cov, weight in zip(case.means, case.covs, case.weights):
        cov_marg = cov + sigma**2 * np.eye(case.dim)
        solved = np.linalg.solve(cov_marg, (x - mean).T).T
        log_det = np.linalg.slogdet(2 * np.pi * cov_marg)[1]
        log_r.append(np.log(weight) - 0.5 * ((x - mean) * solved).sum(1) - 0.5 * log_det)
        x0_k.append(mean + solved @ cov.T)
    log_r = np.stack(log_r, 1)
    return np.einsum("bk,kbd->bd", np.exp(log_r - logsumexp(log_r, 1, keepdims=True)), np.stack(x0_k))


def dop853_reference(case, x_start: np.ndarray, sigma_start: float, sigma_end: float) -> np.ndarray:
    """The PF-ODE solution at sigma_end from x_start [B, D] at sigma_start, independently of difflab:
    dx/d ln σ = σ·ε̂ = x − D(x; σ), DOP853 at rtol = atol = 1e-12 (error ~1e-10)."""
    dim = x_start.shape[1]

    def dx_dlogsigma(log_sigma, x_flat):
        x = x_flat.reshape(-1, dim)
        return (x - np_denoiser_vectorised(case, x, math.exp(log_sigma))).ravel()

    ode = solve_ivp(dx_dlogsigma, (math.log(sigma_start), math.log(sigma_end)), x_start.ravel(),
                    method="DOP853", rtol=1e-12, atol=1e-12)
    assert ode.success, ode.message
    return ode.y[:, -1].reshape(-1, dim)
