"""Numerical guards for sampling loops: stop at the first non-finite state and say where."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from difflab.core.errors import NonFiniteError

Callback = Callable[[int, Tensor, float], None]


def finite_guard(solver: str, sigmas: Tensor, callback: Callback | None = None) -> Callback:
    """A step callback `(i, x_i, sigma_next)` that raises NonFiniteError naming the solver, the step
    and its σ interval as soon as x_i holds a NaN or an infinity, then calls `callback` if given."""
    sigma_list = torch.as_tensor(sigmas).tolist()

    def guard(i: int, x_i: Tensor, sigma_next: float) -> None:
        if not bool(torch.isfinite(x_i).all()):
            raise NonFiniteError(f"solver {solver!r} produced a non-finite state at step {i} "
                                 f"(sigma {sigma_list[i]:.4g} -> {float(sigma_next):.4g}); check the model's output")
        if callback:
            callback(i, x_i, sigma_next)

    return guard
