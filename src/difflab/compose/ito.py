"""Log-density tracking along a sampling path: the Itô density estimator (SDE) and its ODE form.

SuperDiff (Skreta et al., ICLR 2025; docs/methods/superdiff.md). σ-space: x_σ = x0 + σ·ε, forward SDE
dx = sqrt(2σ) dW (f = 0, g² = 2σ with σ as time), score s_i = −ε̂_i/σ. One reverse step
σ → σ − h (h = |dσ| > 0) of any drift, with the forward noise coefficient:

    dx = 2·dσ·ε̂_mix + ξ,   ξ = sqrt(2σh)·z                                    (reverse SDE, EDM eq. 6, β = 1/σ)

Itô's lemma on log q_σ(x) with the heat equation ∂_σ q = σ·Δq gives, at the left point,

    Δ log q_i = ⟨dx, s_i⟩ − σh·‖s_i‖² = −⟨dx, ε̂_i⟩/σ − (h/σ)·‖ε̂_i‖²            (Itô density estimator)

(the ½·tr(∇² log q)·(dx)² Itô term cancels the Laplacian in ∂_σ log q, so no divergence is needed).
Along a deterministic path dx/dσ = u (continuity equation, v_i = ε̂_i the model's own velocity):

    d log q_i/dσ = −∇·ε̂_i + ⟨ε̂_i, ε̂_i − u⟩/σ                                   (ODE form)

whose divergence is estimated with Hutchinson's trick, E_z[zᵀ J z] = tr J for Rademacher z.

The Itô form assumes the increment's noise is the full ξ. SuperDiff's AND rule breaks that: its κ
depends on the same step's ξ and its drift cancels ξ's component in span{ε̂_i − ε̂_M} (for two
models, the direction δ̂ of δ = ε̂_1 − ε̂_2). The noise then has covariance 2σh(I − P), and Itô's
lemma gains −σh·tr(P ∇² log q_i) = h·Σ_k u_kᵀ J_i u_k (u_k an orthonormal basis of that span,
J_i = ∂ε̂_i/∂x): `projected_noise_correction`. Without it the AND estimates carry a bias of order
∫ σ δ̂ᵀ∇²log q δ̂ dσ that does not vanish as the steps grow.
All inner products are taken in float64; increments are [N, M] float64.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def inner(a: Tensor, b: Tensor, sample_ndim: int) -> Tensor:
    """⟨a, b⟩ summed over the last `sample_ndim` dimensions, in float64."""
    return (a.double() * b.double()).flatten(-sample_ndim).sum(-1)


def ito_increment(dx: Tensor, eps_models: Tensor, sigma: float, h: float) -> Tensor:
    """Itô density estimator for one reverse-SDE step σ → σ − h (docs/methods/superdiff.md (3)).

    Δ log q_i = −⟨dx, ε̂_i⟩/σ − (h/σ)·‖ε̂_i‖², with dx the realised increment (noise included) and
    ε̂_i each model's prediction at the point before the step (left point, Itô).
    dx: [N, ...]; eps_models: [M, N, ...]. Returns [N, M] float64.
    """
    sample_ndim = dx.ndim - 1
    along = inner(eps_models, dx, sample_ndim)                     # ⟨dx, ε̂_i⟩        [M, N]
    norm2 = inner(eps_models, eps_models, sample_ndim)             # ‖ε̂_i‖²           [M, N]
    return (-along / sigma - (h / sigma) * norm2).T


def ode_increment(u: Tensor, eps_models: Tensor, divergence: Tensor, sigma: float, h: float) -> Tensor:
    """Log-density change of each model over one Euler step σ → σ − h of dx/dσ = u (docs/methods/superdiff.md (5)).

    d log q_i/dσ = −∇·ε̂_i + ⟨ε̂_i, ε̂_i − u⟩/σ, times dσ = −h:
    Δ log q_i = h·∇·ε̂_i − (h/σ)·⟨ε̂_i, ε̂_i − u⟩.
    u: [N, ...]; eps_models: [M, N, ...]; divergence: [M, N] (of ε̂_i w.r.t. x). Returns [N, M] float64.
    """
    sample_ndim = u.ndim - 1
    mismatch = inner(eps_models, eps_models - u, sample_ndim)      # ⟨ε̂_i, ε̂_i − u⟩  [M, N]
    return (h * divergence.double() - (h / sigma) * mismatch).T


def rademacher(draw_normal: Callable[[], Tensor]) -> Tensor:
    """A Rademacher probe (±1 entries) as the sign of a normal draw, so it follows the caller's seeding."""
    z = draw_normal()
    return torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def hutchinson(jvp_or_vjp: Tensor, probe: Tensor, sample_ndim: int) -> Tensor:
    """Hutchinson's divergence estimate zᵀJz from J·z (or Jᵀ·z) and the probe z. -> [..., N] float64."""
    return inner(jvp_or_vjp, probe, sample_ndim)


def projected_noise_correction(jvp_basis: Tensor, basis: Tensor, h: float) -> Tensor:
    """The Itô term a step loses when its noise has no component in span{u_k} (SuperDiff AND).

    Δ log q_i gains −σh·Σ_k u_kᵀ ∇² log q_i u_k = h·Σ_k u_kᵀ J_i u_k, with ∇² log q_i = −J_i/σ.
    jvp_basis: [K, M, N, ...] J_i·u_k (or u_kᵀJ_i: same quadratic form); basis: [K, N, ...]
    orthonormal per sample. Returns [N, M] float64.
    """
    sample_ndim = basis.ndim - 2
    return h * inner(jvp_basis, basis[:, None], sample_ndim).sum(0).T
