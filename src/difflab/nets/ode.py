"""Integrators for the ODE blocks of the cU-Net: h(1) from dh/ds = f(s, h), h(0) = h0, s ∈ [0, 1].

Fixed-step explicit Runge–Kutta methods, written here (every step reuses f's weights, so depth
comes from integration, not parameters):

    euler     h + Δs·f(s, h)                                      1 evaluation, order 1
    midpoint  h + Δs·f(s + Δs/2, h + Δs/2·f(s, h))                2 evaluations, order 2
    rk4       h + Δs/6·(k1 + 2k2 + 2k3 + k4)  (classical RK4)     4 evaluations, order 4

Any other method name (dopri5, bosh3, adaptive_heun, ...) goes to torchdiffeq (Chen et al.
2018) when it is installed: adaptive step sizes with tolerances rtol/atol, and optionally the
adjoint method (memory constant in the number of steps; gradients by a backward ODE solve).
`backend="torchdiffeq"` sends the fixed methods there too (note torchdiffeq's "rk4" is the
3/8-rule variant, not the classical RK4 above).
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from difflab.core.errors import ConfigError

Dynamics = Callable[[Tensor, Tensor], Tensor]  # f(s, h) -> dh/ds, s a scalar tensor, h [B, ...]


def euler_step(f: Dynamics, s: Tensor, h: Tensor, ds: Tensor) -> Tensor:
    """One explicit Euler step: h + Δs·f(s, h)."""
    return h + ds * f(s, h)


def midpoint_step(f: Dynamics, s: Tensor, h: Tensor, ds: Tensor) -> Tensor:
    """One explicit midpoint step (RK2): h + Δs·f(s + Δs/2, h + Δs/2·f(s, h))."""
    return h + ds * f(s + ds / 2, h + ds / 2 * f(s, h))


def rk4_step(f: Dynamics, s: Tensor, h: Tensor, ds: Tensor) -> Tensor:
    """One classical Runge–Kutta step (Kutta 1901): h + Δs/6·(k1 + 2k2 + 2k3 + k4)."""
    k1 = f(s, h)
    k2 = f(s + ds / 2, h + ds / 2 * k1)
    k3 = f(s + ds / 2, h + ds / 2 * k2)
    k4 = f(s + ds, h + ds * k3)
    return h + ds / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


FIXED_STEPS = {"euler": euler_step, "midpoint": midpoint_step, "rk4": rk4_step}
EVALUATIONS_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4}
BACKENDS = ("fixed", "torchdiffeq")


def torchdiffeq_available() -> bool:
    return importlib.util.find_spec("torchdiffeq") is not None


@dataclass(frozen=True)
class ODESolver:
    """How an ODE block integrates over s ∈ [0, 1].

    method: euler | midpoint | rk4 (fixed steps, written here) or any torchdiffeq method.
    steps: number of equal steps of a fixed-step method (also torchdiffeq's for its fixed ones).
    backend: "fixed" (the methods above) or "torchdiffeq"; adaptive methods need torchdiffeq.
    rtol, atol: tolerances of an adaptive torchdiffeq method.
    adjoint: gradients by torchdiffeq's adjoint method (torchdiffeq backend only).
    """

    method: str = "rk4"
    steps: int = 1
    backend: str = "fixed"
    rtol: float = 1e-3
    atol: float = 1e-4
    adjoint: bool = False

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"ODE backend must be one of {BACKENDS}, got {self.backend!r}.")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"ODE steps must be a positive int, got {self.steps!r}.")
        if self.backend == "fixed" and self.method not in FIXED_STEPS:
            raise ConfigError(
                f"ODE method {self.method!r} is not a fixed-step method ({sorted(FIXED_STEPS)}); "
                "for adaptive methods (dopri5, ...) use backend='torchdiffeq'."
            )
        if self.backend == "fixed" and self.adjoint:
            raise ConfigError("the adjoint method needs backend='torchdiffeq'.")
        if self.backend == "torchdiffeq":
            if not torchdiffeq_available():
                raise ConfigError(
                    "backend='torchdiffeq' needs the torchdiffeq package (pip install torchdiffeq); "
                    "or use backend='fixed' with euler, midpoint or rk4."
                )
            from torchdiffeq._impl.odeint import SOLVERS
            if self.method not in SOLVERS:
                raise ConfigError(f"torchdiffeq has no method {self.method!r}; known: {sorted(SOLVERS)}.")
        if self.rtol <= 0 or self.atol <= 0:
            raise ConfigError(f"ODE tolerances must be > 0, got rtol={self.rtol}, atol={self.atol}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def evaluations(self) -> int | None:
        """Evaluations of f per block (None where an adaptive method decides)."""
        per_step = EVALUATIONS_PER_STEP.get(self.method)  # torchdiffeq's fixed ones cost the same
        return None if per_step is None else per_step * self.steps


def integrate(f: Dynamics, h0: Tensor, solver: ODESolver = ODESolver(),
              adjoint_params: Sequence[Tensor] = ()) -> Tensor:
    """h(1) for dh/ds = f(s, h), h(0) = h0 (any shape [B, ...]).

    adjoint_params: every tensor f reads that needs a gradient (its parameters, the conditioning);
    used only by the adjoint method, which otherwise could not see them.
    """
    if solver.backend == "fixed":
        return _integrate_fixed(f, h0, FIXED_STEPS[solver.method], solver.steps)
    return _integrate_torchdiffeq(f, h0, solver, adjoint_params)


def _integrate_fixed(f: Dynamics, h: Tensor, step, steps: int) -> Tensor:
    ds = torch.tensor(1.0 / steps, dtype=h.dtype, device=h.device)
    for i in range(steps):
        h = step(f, i * ds, h, ds)
    return h


def _integrate_torchdiffeq(f: Dynamics, h0: Tensor, solver: ODESolver,
                           adjoint_params: Sequence[Tensor]) -> Tensor:
    import torchdiffeq

    span = torch.tensor([0.0, 1.0], dtype=h0.dtype, device=h0.device)
    options = {"step_size": 1.0 / solver.steps} if solver.method in EVALUATIONS_PER_STEP else None
    kwargs = {"rtol": solver.rtol, "atol": solver.atol, "method": solver.method, "options": options}
    if solver.adjoint:
        params = tuple(p for p in adjoint_params if p.requires_grad)
        return torchdiffeq.odeint_adjoint(f, h0, span, adjoint_params=params, **kwargs)[-1]
    return torchdiffeq.odeint(f, h0, span, **kwargs)[-1]


__all__ = ["BACKENDS", "FIXED_STEPS", "ODESolver", "euler_step", "integrate", "midpoint_step", "rk4_step",
           "torchdiffeq_available"]
