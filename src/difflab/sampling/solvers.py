"""Probability-flow ODE solvers in σ-space (dx/dσ = ε̂), one short function each.

Each takes a denoiser, the initial state x at sigmas[0] and a decreasing grid, and returns the
state at sigmas[-1]. A final σ of exactly 0 is reached by one Euler step, i.e. x ← D(x; σ).
`callback(i, x, sigma_next)` runs after each step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

from ..core.denoiser import eps

Callback = Callable[[int, Tensor, float], None] | None


def euler(denoiser, x: Tensor, sigmas: Tensor, callback: Callback = None, **cond: Any) -> Tensor:
    """Euler on the probability-flow ODE (= DDIM in σ-space; Karras et al. 2022, eq. 4). NFE = N−1."""
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
        d = eps(denoiser, x, sigma, **cond)                       # dx/dσ = (x − D)/σ
        x = x + (sigma_next - sigma) * d
        if callback:
            callback(i, x, sigma_next)
    return x


def heun(denoiser, x: Tensor, sigmas: Tensor, callback: Callback = None, **cond: Any) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1). NFE = 2(N−1), minus 1 if σ_N = 0."""
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
        d = eps(denoiser, x, sigma, **cond)
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next == 0:                                      # Alg. 1 line 8: no correction at σ = 0
            x = x_euler
        else:
            d_next = eps(denoiser, x_euler, sigma_next, **cond)
            x = x + (sigma_next - sigma) * (d + d_next) / 2      # trapezoid rule
        if callback:
            callback(i, x, sigma_next)
    return x


@dataclass(frozen=True)
class Solver:
    """A registered solver: its function, its NFE for a grid of n points, whether it draws noise."""

    fn: Callable[..., Tensor]
    nfe: Callable[[int, bool], int]      # (n points, grid ends at 0) -> model evaluations
    stochastic: bool = False


SOLVERS: dict[str, Solver] = {
    "euler": Solver(euler, lambda n, to_zero: n - 1),
    "heun": Solver(heun, lambda n, to_zero: 2 * (n - 1) - int(to_zero)),
}
