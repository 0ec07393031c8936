"""`difflab.sample`: run any registered solver from an initial state over a grid, with guards."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from difflab.core.errors import ConfigError, ShapeError, UnknownNameError
from difflab.sampling.grids import check_grid, get_sigmas, points_for_nfe
from difflab.sampling.guards import finite_guard
from difflab.sampling.noise import PerSampleGenerator
from difflab.sampling.registry import SOLVERS

LOW_PRECISION = (torch.float16, torch.bfloat16)


def sample(denoiser, x: Tensor, sigmas: Tensor, solver: str = "heun",
           generator: torch.Generator | PerSampleGenerator | None = None,
           callback: Callable[[int, Tensor, float], None] | None = None, afs: bool = False, **cond: Any) -> Tensor:
    """Integrate from the state x at sigmas[0] down to sigmas[-1] with the named solver.

    x: [B, ...] initial state (pure noise: sigmas[0]·z); sigmas: [N] strictly decreasing, may end
    at 0; cond: passed to the denoiser untouched. Stochastic solvers draw from `generator`.
    afs: analytical first step (no model call on the first step; docs/methods/solvers.md (21)).
    Stops with NonFiniteError (solver, step, σ) as soon as the state stops being finite.
    An fp16 / bf16 x is integrated in float32 (rounding in a 16-bit state would swamp a step's
    increment) and returned in its own dtype; the denoiser's wrapper runs the network in its own.
    Returns x at sigmas[-1], [B, ...] in x's dtype.
    """
    if solver not in SOLVERS:
        raise UnknownNameError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    sigmas = check_grid(sigmas, getattr(denoiser, "sigma_min", None), getattr(denoiser, "sigma_max", None))
    _check_shape(denoiser, x)
    spec = SOLVERS[solver]

    extra = {"generator": generator} if spec.stochastic else {}
    state = x.float() if x.dtype in LOW_PRECISION else x          # the solver state is at least float32
    out = spec.fn(denoiser, state, sigmas, callback=finite_guard(solver, sigmas, callback), afs=afs, **extra, **cond)
    return out.to(x.dtype)


def sigmas_for_nfe(solver: str, nfe: int, kind: str = "karras", sigma_min: float = 0.002, sigma_max: float = 80.0,
                   rho: float = 7.0, afs: bool = False, to_zero: bool = False) -> Tensor:
    """The grid on which `solver` spends exactly `nfe` model evaluations: [n] float64, decreasing.

    `kind`, sigma_min, sigma_max, rho: as in `get_sigmas`; to_zero appends σ = 0 (its point counts
    in n). Raises ConfigError naming the nearest budgets the solver can spend, UnknownNameError for
    an unknown solver.
    """
    if solver not in SOLVERS:
        raise UnknownNameError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    spec = SOLVERS[solver]
    n = points_for_nfe(nfe, lambda points: spec.nfe(points, to_zero, afs), solver)
    if to_zero and n < 3:   # get_sigmas needs two positive levels before the appended zero
        raise ConfigError(f"solver {solver!r} spends {nfe} evaluations on a grid of {n} points ending at 0, "
                          "which has fewer than two positive levels; ask for a larger nfe or to_zero=False")
    sigmas = get_sigmas(kind, n - int(to_zero), sigma_min, sigma_max, rho)
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if to_zero else sigmas


def _check_shape(denoiser, x: Tensor) -> None:
    data_shape = getattr(denoiser, "data_shape", None)
    if data_shape is not None and tuple(x.shape[1:]) != tuple(data_shape):
        raise ShapeError(f"x has per-sample shape {tuple(x.shape[1:])}, the model expects {tuple(data_shape)}")
