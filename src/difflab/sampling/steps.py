"""What every solver shares: the `Solver` record, the first step's ε̂ (with AFS), log / expm1 on
floats or per-sample tensors, diffusers' lower-order-final rule and the NFE counters."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from difflab.core.denoiser import eps

Callback = Callable[[int, Tensor, float], None] | None


@dataclass(frozen=True)
class Solver:
    """A registered solver: its function, its NFE, whether it draws noise, its order of accuracy."""

    fn: Callable[..., Tensor]
    nfe: Callable[[int, bool, bool], int]   # (n points, grid ends at 0, afs) -> model evaluations
    stochastic: bool = False
    order: float = 1


def one_per_step(n: int, to_zero: bool, afs: bool) -> int:
    return n - 1 - int(afs)


def two_per_step(n: int, to_zero: bool, afs: bool) -> int:
    # the step to σ = 0 costs one; AFS saves one, on the first step (when that is also the σ = 0 step, both)
    return 2 * (n - 1) - int(to_zero) - int(afs)


def first_eps(denoiser, x: Tensor, sigma: float, afs: bool, **cond: Any) -> Tensor:
    """ε̂ for a solver's first step: the model's, or with AFS d = x/sqrt(1 + σ0²), no evaluation.

    AFS (AMED, Zhou et al. 2024, §3.4): at σ_max the state is almost pure noise, x ≈ sqrt(1 + σ²)·ε.
    """
    if afs:
        return x / math.sqrt(1 + float(sigma) ** 2)
    return eps(denoiser, x, sigma, **cond)


def grid_steps(sigmas: Tensor) -> list[tuple[int, float, float]]:
    return list(enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())))


LOWER_ORDER_FINAL_BELOW = 15   # diffusers' DPMSolverMultistepScheduler threshold (the DPM-Solver code uses 10)


def log_(v):
    """log of a float or a tensor (σ's are floats on a shared grid, [B, 1, …] tensors in AMED-Plugin)."""
    return torch.log(v) if isinstance(v, Tensor) else math.log(v)


def expm1_(v):
    return torch.expm1(v) if isinstance(v, Tensor) else math.expm1(v)


def lower_order_final(order: int, step: int, n_steps: int) -> int:
    """diffusers' `lower_order_final`: with fewer than 15 steps the last step is first order, the one
    before at most second."""
    return min(order, n_steps - step) if n_steps < LOWER_ORDER_FINAL_BELOW else order
