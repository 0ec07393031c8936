"""`difflab.sample`: run any registered solver from an initial state over a grid, with guards."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..errors import NonFiniteError, ShapeError, UnknownNameError
from .grids import check_grid
from .noise import PerSampleGenerator
from .solvers import SOLVERS


def sample(denoiser, x: Tensor, sigmas: Tensor, solver: str = "heun",
           generator: torch.Generator | PerSampleGenerator | None = None,
           callback: Callable[[int, Tensor, float], None] | None = None, **cond: Any) -> Tensor:
    """Integrate from the state x at sigmas[0] down to sigmas[-1] with the named solver.

    x: [B, ...] initial state (pure noise: sigmas[0]·z); sigmas: [N] strictly decreasing, may end
    at 0; cond: passed to the denoiser untouched. Stochastic solvers draw from `generator`.
    Stops with NonFiniteError (solver, step, σ) as soon as the state stops being finite.
    Returns x at sigmas[-1], [B, ...].
    """
    if solver not in SOLVERS:
        raise UnknownNameError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    sigmas = check_grid(sigmas, getattr(denoiser, "sigma_min", None), getattr(denoiser, "sigma_max", None))
    _check_shape(denoiser, x)
    spec = SOLVERS[solver]

    def guarded_callback(i: int, x_i: Tensor, sigma_next: float) -> None:
        if not bool(torch.isfinite(x_i).all()):
            raise NonFiniteError(f"solver {solver!r} produced a non-finite state at step {i} "
                                 f"(sigma {float(sigmas[i]):.4g} -> {sigma_next:.4g}); check the model's output")
        if callback:
            callback(i, x_i, sigma_next)

    extra = {"generator": generator} if spec.stochastic else {}
    return spec.fn(denoiser, x, sigmas, callback=guarded_callback, **extra, **cond)


def _check_shape(denoiser, x: Tensor) -> None:
    data_shape = getattr(denoiser, "data_shape", None)
    if data_shape is not None and tuple(x.shape[1:]) != tuple(data_shape):
        raise ShapeError(f"x has per-sample shape {tuple(x.shape[1:])}, the model expects {tuple(data_shape)}")
