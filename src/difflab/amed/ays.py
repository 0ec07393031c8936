"""Align Your Steps (Sabour, Fidler, Kreis, ICML 2024): the schedule that minimises the KLUB.

The reverse SDE in σ-space (σ(t) = t, EDM) and its linearisation on [t_{k+1}, t_k], where the solver
freezes the denoiser at the start of the step (stochastic DDIM / SDE-DPM-Solver-1), differ only in
the drift, 2(x − D(x; t))/t against 2(x − D(x_{t_k}; t_k))/t, with diffusion g² = 2t. Girsanov's
theorem bounds the KL divergence between the two path measures by (docs/methods/grids.md (A1)–(A3))

    KLUB = Σ_k ∫_{t_{k+1}}^{t_k} (1/t³) E ‖D(x_t; t) − D(x_{t_k}; t_k)‖² dt                      (A3)

the expectation over paths of the true process, which are those of the forward process:
x_t = x_low + sqrt(t² − σ_low²)·ε₁, x_{t_k} = x_t + sqrt(t_k² − t²)·ε₂ (A4). The integral over t is
taken by Gauss–Legendre quadrature in log t (∫ f(t)/t³ dt = ∫ f(e^u)·e^{−2u} du) with the same noise
at every evaluation (common random numbers), so two schedules are compared on the same draws.
The schedule is refined coordinate by coordinate (A5): each interior t_k in turn is searched over
candidates in its neighbourhood (t_{k+1}, t_{k−1}), keeping a candidate only if the two KLUB terms it
touches drop; each round subdivides the neighbourhood (halves its width).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from difflab.core.denoiser import append_dims


def klub_noise(x_low: Tensor, nodes: int, generator: torch.Generator) -> Tensor:
    """The common random numbers of the estimator: [nodes, 2, B, ...] standard normals (ε₁, ε₂ per node)."""
    return torch.randn((nodes, 2, *x_low.shape), generator=generator, dtype=x_low.dtype).to(x_low.device)


def interval_klub(denoiser, sigma_hi: float, sigma_lo: float, x_low: Tensor, sigma_low: float, noise: Tensor,
                  **cond: Any) -> float:
    """One term of (A3): ∫_{sigma_lo}^{sigma_hi} (1/t³) E‖D(x_t; t) − D(x_hi; sigma_hi)‖² dt.

    x_low: [B, ...] samples of the model's marginal at sigma_low (≤ sigma_lo); noise: [Q, 2, B, ...]
    (`klub_noise`), Q the Gauss–Legendre nodes in log t. Paths as in (A4)."""
    nodes = noise.shape[0]
    unit_nodes, unit_weights = np.polynomial.legendre.leggauss(nodes)            # on [−1, 1]
    u_lo, u_hi = math.log(sigma_lo), math.log(sigma_hi)
    u = torch.as_tensor((u_hi - u_lo) / 2 * unit_nodes + (u_hi + u_lo) / 2, dtype=torch.float64)
    weights = torch.as_tensor((u_hi - u_lo) / 2 * unit_weights, dtype=torch.float64) * (-2 * u).exp()   # e^{−2u}
    t = u.exp()
    batch = x_low.shape[0]
    t_b = append_dims(t.to(x_low), x_low.ndim + 1)                                # [Q, 1, ...]
    x_t = x_low + (t_b**2 - sigma_low**2).clamp_min(0).sqrt() * noise[:, 0]       # (A4)
    x_hi = x_t + (sigma_hi**2 - t_b**2).clamp_min(0).sqrt() * noise[:, 1]
    flat = lambda v: v.reshape(nodes * batch, *x_low.shape[1:])  # noqa: E731
    sigma_t = t.to(x_low).repeat_interleave(batch)
    with torch.no_grad():
        d_t = denoiser(flat(x_t), sigma_t, **_repeat(cond, nodes))
        d_hi = denoiser(flat(x_hi), torch.full_like(sigma_t, sigma_hi), **_repeat(cond, nodes))
    squared = (d_t - d_hi).double().reshape(nodes, batch, -1).square().sum(-1).mean(1)   # E‖ΔD‖² at each node
    return float((weights * squared.cpu()).sum())


def klub_terms(denoiser, sigmas: Tensor, x_low: Tensor, sigma_low: float, noise: Tensor, **cond: Any) -> Tensor:
    """The KLUB (A3) interval by interval: [K] float64 for sigmas [K + 1] (decreasing, sigmas[-1] ≥ sigma_low)."""
    levels = torch.as_tensor(sigmas, dtype=torch.float64).tolist()
    return torch.tensor([interval_klub(denoiser, hi, lo, x_low, sigma_low, noise, **cond)
                         for hi, lo in zip(levels[:-1], levels[1:])], dtype=torch.float64)


def refine_schedule(term: Callable[[float, float], float], sigmas: Tensor, rounds: int, candidates: int,
                    stop_score: Callable[[Tensor], float] | None = None) -> tuple[Tensor, list[tuple[int, float]]]:
    """Coordinate refinement (A5) of sigmas [K + 1] (ends fixed) under term(σ_hi, σ_lo) -> one KLUB term.

    Round r searches each interior σ_k over `candidates` points, even in log σ, of the window of relative width
    2^{−r} around it inside (σ_{k+1}, σ_{k−1}), and keeps the best if it lowers term(σ_{k−1}, σ_k) +
    term(σ_k, σ_{k+1}). Early stopping: with stop_score(sigmas) -> float (lower is better), the schedule after
    the round of least score (round 0: the start) is returned. Returns the sigmas [K + 1] float64 and history
    [(round, total KLUB)] up to the round returned."""
    log_sigmas = torch.as_tensor(sigmas, dtype=torch.float64).log().tolist()
    terms = [term(math.exp(a), math.exp(b)) for a, b in zip(log_sigmas[:-1], log_sigmas[1:])]
    history = [(0, sum(terms))]
    rounds_kept = [_exact_ends(log_sigmas, sigmas)]
    scores = [stop_score(rounds_kept[0]) if stop_score else 0.0]
    for round_index in range(rounds):
        width = 0.5**round_index
        for k in range(1, len(log_sigmas) - 1):
            upper, centre, lower = log_sigmas[k - 1], log_sigmas[k], log_sigmas[k + 1]
            low_end, high_end = centre - width * (centre - lower), centre + width * (upper - centre)
            for candidate in np.linspace(low_end, high_end, candidates + 2)[1:-1].tolist():
                pair = (term(math.exp(upper), math.exp(candidate)), term(math.exp(candidate), math.exp(lower)))
                if sum(pair) < terms[k - 1] + terms[k]:               # keep it only if the KLUB drops
                    log_sigmas[k], (terms[k - 1], terms[k]) = candidate, pair
        history.append((round_index + 1, sum(terms)))
        rounds_kept.append(_exact_ends(log_sigmas, sigmas))
        scores.append(stop_score(rounds_kept[-1]) if stop_score else -float(round_index + 1))
    best = min(range(len(scores)), key=scores.__getitem__)
    return rounds_kept[best], history[: best + 1]


def _exact_ends(log_sigmas: list[float], start: Tensor) -> Tensor:
    refined = torch.tensor(log_sigmas, dtype=torch.float64).exp()
    refined[0], refined[-1] = float(start[0]), float(start[-1])       # the ends exactly, free of round-off
    return refined


def fit_ays(denoiser, sigmas: Tensor, x_low: Tensor, sigma_low: float, nodes: int, rounds: int, candidates: int,
            seed: int, stop_score: Callable[[Tensor], float] | None = None,
            **cond: Any) -> tuple[Tensor, list[tuple[int, float]]]:
    """AYS from the starting schedule sigmas [K + 1]: (A5) on the estimate (A3)–(A4) from x_low [B, ...] at sigma_low
    (stop_score: early stopping, see `refine_schedule`). Returns (sigmas [K + 1] float64, history [(round, KLUB)])."""
    noise = klub_noise(x_low, nodes, torch.Generator().manual_seed(seed))

    def term(sigma_hi: float, sigma_lo: float) -> float:
        return interval_klub(denoiser, sigma_hi, sigma_lo, x_low, sigma_low, noise, **cond)

    return refine_schedule(term, sigmas, rounds, candidates, stop_score)


def _repeat(cond: dict, times: int) -> dict:
    """Tensor conditioning repeated along the batch for the Q stacked quadrature nodes."""
    return {k: v.repeat(times, *[1] * (v.ndim - 1)) if isinstance(v, Tensor) and v.ndim else v for k, v in cond.items()}


__all__ = ["fit_ays", "interval_klub", "klub_noise", "klub_terms", "refine_schedule"]
