"""AMED-Plugin: AMED's learned intermediate point inserted into any base solver (Zhou et al., CVPR 2024,
§3.3; docs/methods/amed.md (9)).

Every interval t_cur → t_next of the grid is split at the learned point s = t_next^r · t_cur^{1−r}
(per sample), and the base solver runs on t_cur → s → t_next with its usual history: the denoiser
is evaluated at a·s (the division by s, as in AMED-Solver) and only the second sub-step's increment
is scaled by c. With r = ½, c = 1, a = 1 this *is* the base solver on the grid refined by the
log-midpoints (tests/amed/test_plugin.py checks it to round-off for every base).

Bases: `euler`, `ipndm` (fixed-coefficient AB up to order 4), `dpmpp_2m`, `dpmpp_3m`, `unipc`
(predictor–corrector; the public AMED code has no UniPC plugin), and `dpm2`, whose plugin is
AMED-Solver itself (`amed.amed_solver`). Each base's step is the same function its full solver
uses (`ipndm_weights`, `dpmpp_update`, `unipc_update`), called with per-sample σ tensors.

Cost: two evaluations per interval (one at t_cur, one at a·s), minus one with AFS, minus one for a
last step to σ = 0 (x ← D(x; t_cur)): `amed.amed_nfe`, the same as AMED-Solver.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from difflab.amed.predictor import AMEDParams, amed_solver, check_predictor
from difflab.core.denoiser import append_dims, last_feature, sigma_batch
from difflab.core.errors import ConfigError
from difflab.sampling.grids import check_grid
from difflab.sampling.guards import finite_guard
from difflab.sampling.multistep import ipndm_weights, unipc_update
from difflab.sampling.solvers import dpmpp_update
from difflab.sampling.steps import lower_order_final

Callback = Callable[[int, Tensor, float], None] | None


@dataclass
class Point:
    """One evaluation on the (refined) grid: σ (float, or [B, 1, …] per sample), D and ε̂ = (x − D)/σ."""

    sigma: Any
    x0_hat: Tensor
    eps: Tensor


@dataclass
class PluginState:
    """What a base solver carries from one sub-step to the next (for multistep bases and UniC)."""

    x: Tensor
    history: list[Point] = field(default_factory=list)       # newest last
    substep: int = 0                                          # index j on the refined grid
    previous: tuple | None = None                             # (x, σ, order, c) of the last sub-step, for UniC

    def detach(self) -> "PluginState":
        """The same state cut from the autograd graph (continuation across fitting intervals)."""
        cut = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
        history = [Point(cut(p.sigma), p.x0_hat.detach(), p.eps.detach()) for p in self.history]
        previous = None if self.previous is None else tuple(cut(v) for v in self.previous)
        return PluginState(self.x.detach(), history, self.substep, previous)


# ----- the bases: x_next = update(x, σ, σ_next, history, order) -----------------------------------
def _euler(x: Tensor, sigma, sigma_next, history: list[Point], order: int) -> Tensor:
    return x + (sigma_next - sigma) * history[-1].eps           # dx/dσ = ε̂


def _ipndm(x: Tensor, sigma, sigma_next, history: list[Point], order: int) -> Tensor:
    weights = ipndm_weights(range(order), sigma, sigma_next)    # (σ_next − σ)·AB_COEFFS[order − 1]
    return x + sum(b_j * p.eps for b_j, p in zip(weights, reversed(history)))


def _dpmpp(taylor_d2: bool) -> Callable[..., Tensor]:
    def update(x: Tensor, sigma, sigma_next, history: list[Point], order: int) -> Tensor:
        return dpmpp_update(x, sigma, sigma_next, [(p.sigma, p.x0_hat) for p in history], order, taylor_d2)
    return update


def _unipc(x: Tensor, sigma, sigma_next, history: list[Point], order: int, x0_hat_next: Tensor | None = None):
    return unipc_update(x, sigma, sigma_next, [(p.sigma, p.x0_hat) for p in history], order, x0_hat_next)


@dataclass(frozen=True)
class PluginBase:
    """A base solver as AMED-Plugin drives it."""

    update: Callable[..., Tensor]
    max_order: int
    lower_order_final: bool = False    # diffusers' rule, applied on the refined grid as the full solver does
    corrector: bool = False            # UniC: correct the last sub-step once the new D is known


PLUGIN_BASES: dict[str, PluginBase] = {
    "euler": PluginBase(_euler, 1),
    "ipndm": PluginBase(_ipndm, 4),
    "dpmpp_2m": PluginBase(_dpmpp(False), 2, lower_order_final=True),
    "dpmpp_3m": PluginBase(_dpmpp(False), 3, lower_order_final=True),
    "unipc": PluginBase(_unipc, 3, lower_order_final=True, corrector=True),
}
ONE_STEP_BASES = ("dpm2", "euler")     # fitted with teacher forcing; the others by continuation
BASE_SOLVERS = ("dpm2", *PLUGIN_BASES)


def check_base(name: str) -> str:
    """The base solver's canonical name ('amed' is AMED-Solver, i.e. the dpm2 plugin)."""
    name = "dpm2" if name == "amed" else name
    if name not in BASE_SOLVERS:
        raise ConfigError(f"AMED-Plugin has no base solver {name!r}; choose one of {list(BASE_SOLVERS)}")
    return name


# ----- one interval ------------------------------------------------------------------------------
def _evaluate(denoiser, x: Tensor, sigma: Tensor, sigma_seen: Tensor, analytic: bool, **cond: Any) -> Point:
    """D at (x, sigma_seen) and ε̂ = (x − D)/σ (σ, sigma_seen: [B, 1, …]); AFS: ε̂ = x/sqrt(1 + σ²), no call."""
    if analytic:
        eps = x / (1 + sigma**2).sqrt()
        return Point(sigma, x - sigma * eps, eps)
    x0_hat = denoiser(x, sigma_seen.flatten(), **cond) if sigma_seen.ndim else denoiser(x, sigma_seen, **cond)
    return Point(sigma, x0_hat, (x - x0_hat) / sigma)


def plugin_substep(base: PluginBase, state: PluginState, point: Point, sigma_next, n_substeps: int,
             c: Tensor | None = None) -> PluginState:
    """(UniC-correct,) record the new point, step to sigma_next; with c, scale this sub-step's increment."""
    x = state.x
    if base.corrector and state.previous is not None:          # UniC-p on the previous sub-step, with the new D
        x_prev, sigma_prev, order_prev, c_prev = state.previous
        x_corrected = base.update(x_prev, sigma_prev, point.sigma, state.history, order_prev, x0_hat_next=point.x0_hat)
        x = x_corrected if c_prev is None else x_prev + c_prev * (x_corrected - x_prev)
    history = (state.history + [point])[-base.max_order:]
    order = len(history)                                          # the order grows with the history
    if base.lower_order_final:
        order = lower_order_final(order, state.substep, n_substeps)
    x_next = base.update(x, point.sigma, sigma_next, history, order)
    if c is not None:
        x_next = x + c * (x_next - x)                             # only the second sub-step's increment is scaled
    return PluginState(x_next, history, state.substep + 1, (x, point.sigma, order, c))


def plugin_interval(denoiser, predictor, base: PluginBase, state: PluginState, t_cur: float, t_next: float,
                    n_substeps: int, analytic_first: bool = False,
                    **cond: Any) -> tuple[PluginState, AMEDParams | None]:
    """One interval t_cur → t_next of AMED-Plugin. Returns the new state and the predictor's (r, c, a)
    (None on a last step to σ = 0, which is x ← D(x; t_cur)). Differentiable in the predictor."""
    x = state.x
    t_cur_b, t_next_b = sigma_batch(float(t_cur), x), sigma_batch(float(t_next), x)       # [B]
    sigma = append_dims(t_cur_b, x.ndim)
    point = _evaluate(denoiser, x, sigma, sigma, analytic_first, **cond)
    if t_next == 0:
        return PluginState(point.x0_hat, state.history, state.substep + 1, None), None
    feature = None if analytic_first else last_feature(denoiser)             # read before the next call
    params = predictor(feature, t_cur_b, t_next_b)                           # (r, c, a) = g_φ(h, t_cur, t_next)
    r, c, a = (append_dims(v.to(x.dtype), x.ndim) for v in (params.r, params.c, params.a))
    s = append_dims(t_next_b, x.ndim) ** r * sigma ** (1 - r)               # s = t_next^r · t_cur^{1−r}
    state = plugin_substep(base, state, point, s, n_substeps)                      # t_cur → s
    mid = _evaluate(denoiser, state.x, s, a * s, False, **cond)             # D(x_s; a·s), ε̂ divided by s
    state = plugin_substep(base, state, mid, float(t_next), n_substeps, c)         # s → t_next, increment × c
    return state, params


def n_substeps_of(sigmas: list[float]) -> int:
    """Sub-steps on the refined grid: two per interval, one for a last step to σ = 0."""
    return 2 * (len(sigmas) - 1) - int(sigmas[-1] == 0)


def amed_plugin(denoiser, x: Tensor, sigmas: Tensor, predictor, base: str = "ipndm", callback: Callback = None,
                afs: bool = True, check: bool = True, **cond: Any) -> Tensor:
    """AMED-Plugin on `base` (see the module docstring) from x at sigmas[0] down to sigmas[-1].

    x: [B, ...]; sigmas: [N] decreasing (may end at 0); predictor: g_φ(feature, t_cur [B], t_next [B])
    -> AMEDParams (an AMEDPredictor, or ConstantPredictor(0.5, 1, 1): the base solver on the
    log-midpoint-refined grid). NFE = 2(N−1) − afs (− 1 for a final 0). With check=True a predictor
    fitted for another base model, NFE, grid or base solver is refused (AddonMismatchError).
    Returns x at sigmas[-1].
    """
    base = check_base(base)
    if base == "dpm2":
        return amed_solver(denoiser, x, sigmas, predictor, callback=callback, afs=afs, check=check, **cond)
    sigmas = check_grid(sigmas, getattr(denoiser, "sigma_min", None), getattr(denoiser, "sigma_max", None))
    if check:
        check_predictor(predictor, denoiser, sigmas, afs, base_solver=base)
    callback = finite_guard(f"amed ({base})", sigmas, callback)   # NonFiniteError names the step and σ
    sigma_list = torch.as_tensor(sigmas).tolist()
    n_substeps = n_substeps_of(sigma_list)
    state = PluginState(x)
    for i, (t_cur, t_next) in enumerate(zip(sigma_list[:-1], sigma_list[1:])):
        state, _ = plugin_interval(denoiser, predictor, PLUGIN_BASES[base], state, t_cur, t_next, n_substeps,
                                   analytic_first=afs and i == 0, **cond)
        callback(i, state.x, t_next)
    return state.x


def refined_sigmas(sigmas: Tensor) -> Tensor:
    """The grid with each interval's log-midpoint sqrt(σ_i σ_{i+1}) inserted (what r = ½ gives): [2N − 1] float64."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    mids = (sigmas[:-1] * sigmas[1:]).sqrt()
    return torch.cat([torch.stack([sigmas[:-1], mids], 1).flatten(), sigmas[-1:]])


__all__ = ["amed_plugin", "amed_sample", "plugin_interval", "PluginState", "PluginBase", "PLUGIN_BASES", "BASE_SOLVERS",
           "ONE_STEP_BASES", "check_base", "n_substeps_of", "plugin_substep", "refined_sigmas"]


def amed_sample(denoiser, x: Tensor, sigmas: Tensor, predictor, callback: Callback = None, afs: bool | None = None,
                check: bool = True, **cond: Any) -> Tensor:
    """AMED-Solver or AMED-Plugin, whichever base solver the predictor was fitted for (and its AFS setting)."""
    fitted = getattr(predictor, "fitted_for", {}) or {}
    afs = fitted.get("afs", True) if afs is None else afs
    return amed_plugin(denoiser, x, sigmas, predictor, base=fitted.get("base_solver") or "dpm2", callback=callback,
                       afs=afs, check=check, **cond)
