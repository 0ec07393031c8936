"""Probability-flow ODE (and reverse-SDE) solvers in σ-space (dx/dσ = ε̂), one short function each.

Each takes a denoiser, the initial state x at sigmas[0] and a decreasing grid, and returns the
state at sigmas[-1]. A final σ of exactly 0 is reached by one Euler step, i.e. x ← D(x; σ), one
evaluation, for every solver. `callback(i, x, sigma_next)` runs after each step. With `afs=True`
the first step's ε̂ is the analytical first step (AFS, Zhou et al. 2024) instead of a model call.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from difflab.core.denoiser import eps, sigma_batch
from difflab.sampling.noise import PerSampleGenerator, randn_like
from difflab.sampling.steps import (
    Callback,
    Solver,
    expm1_,
    first_eps,
    grid_steps,
    log_,
    lower_order_final,
    one_per_step,
    two_per_step,
)


def euler_step(x: Tensor, sigma, sigma_next, d: Tensor) -> Tensor:
    """An Euler step of dx/dσ = d from σ to σ_next (also Heun's and DPM-Solver-2's predictor)."""
    return x + (sigma_next - sigma) * d


def heun_step(x: Tensor, sigma, sigma_next, d: Tensor, d_next: Tensor) -> Tensor:
    """Heun's corrected step: the trapezoid rule on the slopes at σ and σ_next (Karras et al. 2022, Alg. 1 l. 7)."""
    return x + (sigma_next - sigma) * (d + d_next) / 2


def dpm2_midpoint(sigma: float, sigma_next: float) -> float:
    """DPM-Solver-2's intermediate level: the log-midpoint sqrt(σ σ_next) (λ = −log σ)."""
    return math.sqrt(sigma * sigma_next)


def euler(denoiser, x: Tensor, sigmas: Tensor, callback: Callback = None, afs: bool = False, **cond: Any) -> Tensor:
    """Euler on the probability-flow ODE (= DDIM in σ-space; Karras et al. 2022, eq. 4). NFE = N−1 (−1 AFS)."""
    for i, (sigma, sigma_next) in grid_steps(sigmas):
        d = first_eps(denoiser, x, sigma, afs and i == 0, **cond)   # dx/dσ = (x − D)/σ
        x = euler_step(x, sigma, sigma_next, d)
        if callback:
            callback(i, x, sigma_next)
    return x


def heun(denoiser, x: Tensor, sigmas: Tensor, callback: Callback = None, afs: bool = False, **cond: Any) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1). NFE = 2(N−1), −1 if σ_N = 0, −1 with AFS."""
    for i, (sigma, sigma_next) in grid_steps(sigmas):
        d = first_eps(denoiser, x, sigma, afs and i == 0, **cond)
        x_euler = euler_step(x, sigma, sigma_next, d)
        if sigma_next == 0:                                      # Alg. 1 line 8: no correction at σ = 0
            x = x_euler
        else:
            x = heun_step(x, sigma, sigma_next, d, eps(denoiser, x_euler, sigma_next, **cond))
        if callback:
            callback(i, x, sigma_next)
    return x


def dpm2(denoiser, x: Tensor, sigmas: Tensor, callback: Callback = None, afs: bool = False, **cond: Any) -> Tensor:
    """DPM-Solver-2 in σ-space (Lu et al. 2022, Alg. 1 with r = ½; docs/methods/solvers.md (9)): the midpoint
    s = sqrt(σ σ_next) (log-midpoint, λ = −log σ). NFE = 2(N−1), −1 if σ_N = 0, −1 with AFS."""
    for i, (sigma, sigma_next) in grid_steps(sigmas):
        d = first_eps(denoiser, x, sigma, afs and i == 0, **cond)
        if sigma_next == 0:                                      # last step to σ = 0: x ← D(x; σ)
            x = euler_step(x, sigma, sigma_next, d)
        else:
            s = dpm2_midpoint(sigma, sigma_next)
            x_mid = euler_step(x, sigma, s, d)                   # Euler to the midpoint
            x = euler_step(x, sigma, sigma_next, eps(denoiser, x_mid, s, **cond))   # full step, midpoint slope
        if callback:
            callback(i, x, sigma_next)
    return x


def dpmpp_update(x: Tensor, sigma, sigma_next, history: list[tuple[Any, Tensor]], order: int,
                 taylor_d2: bool = False) -> Tensor:
    """One DPM-Solver++ step σ → σ_next > 0 of order 1–3 (Lu et al. 2022b, Alg. 2 and its 3M extension).

    history: [(σ_j, D_j)] newest last, the last at σ (earlier ones used by order ≥ 2). σ's are floats
    or tensors broadcastable against x ([B, 1, …]: per-sample grids, as in AMED-Plugin).
    Data prediction with λ = −log σ, h = λ_next − λ, φ1 = expm1(−h): the exact solution of
    dx/dλ = D − x is x_next = (σ_next/σ)·x + σ_next ∫ e^λ D dλ, with D expanded in λ.
    """
    h = log_(sigma) - log_(sigma_next)
    phi1 = expm1_(-h)
    denoised = history[-1][1]
    x = (sigma_next / sigma) * x - phi1 * denoised               # first order (= DDIM): D held constant over the step
    if order >= 2:
        sigma1, denoised1 = history[-2]
        r0 = (log_(sigma1) - log_(sigma)) / h                    # (λ − λ1)/h
        d1_0 = (denoised - denoised1) / r0                       # ≈ h·dD/dλ at the midpoint of [λ1, λ]
        if order == 2:
            return x - 0.5 * phi1 * d1_0                         # Alg. 2: D = (1 + 1/(2r))D0 − 1/(2r)D1
        sigma2, denoised2 = history[-3]
        r1 = (log_(sigma2) - log_(sigma1)) / h                   # (λ1 − λ2)/h
        d1_1 = (denoised1 - denoised2) / r1
        d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)              # ≈ h·dD/dλ at λ
        d2 = (d1_0 - d1_1) / (r0 + r1)                           # ≈ h²/2·d²D/dλ²
        phi2 = phi1 / h + 1                                      # ∫_0^h e^{u−h} u du / h
        phi3 = phi2 / h - 0.5                                    # −∫_0^h e^{u−h} u²/2 du / h²
        # the u²/2 integral is −h²·φ3 and d²D/dλ² ≈ 2·d2/h², hence 2·φ3 for Taylor;
        # the reference code (and diffusers) weight d2 by φ3
        x = x + phi2 * d1 - (2 if taylor_d2 else 1) * phi3 * d2
    return x


def dpmpp_step(x: Tensor, sigma, sigma_next, history: list[tuple[Any, Tensor]], order: int, step: int,
               n_steps: int, taylor_d2: bool = False) -> Tensor:
    """Step `step` of `n_steps` of DPM-Solver++(order M) as `_dpmpp_multistep` takes it: history [(σ_j, D_j)]
    newest last, the last at σ. Order min(order, len(history)), lowered at the end (`lower_order_final`);
    a step to σ = 0 is x ← D."""
    if sigma_next == 0:
        return history[-1][1]
    step_order = lower_order_final(min(order, len(history)), step, n_steps)
    return dpmpp_update(x, sigma, sigma_next, history, step_order, taylor_d2)


def _dpmpp_multistep(denoiser, x: Tensor, sigmas: Tensor, order: int, callback: Callback, afs: bool,
                     taylor_d2: bool = False, **cond: Any) -> Tensor:
    """DPM-Solver++(2M / 3M) (Lu et al. 2022b, Alg. 2 and its 3rd-order extension) in σ-space.

    Order min(order, steps so far + 1); with fewer than 15 steps the last step is first order and
    the one before at most second (diffusers' `lower_order_final`), and a last step to σ = 0 is
    x ← D. The update is `dpmpp_update`. NFE = N−1 (−1 with AFS).

    taylor_d2: weight the second difference by 2φ3, its Taylor-consistent value (a 3rd-order
    update), instead of φ3 as the DPM-Solver reference code and diffusers do (2nd order in that
    term; as accurate or more at few steps on the test mixtures). With the first-order first step
    both are 2nd order overall on a general ODE.
    """
    n_steps = len(sigmas) - 1
    history: list[tuple[float, Tensor]] = []                     # (σ, D) of this and earlier steps, newest last
    for i, (sigma, sigma_next) in grid_steps(sigmas):
        if afs and i == 0:
            denoised = x - sigma * first_eps(denoiser, x, sigma, True)    # AFS: D = x − σ0·d
        else:
            denoised = denoiser(x, sigma_batch(sigma, x), **cond)
        history = (history + [(sigma, denoised)])[-3:]
        x = dpmpp_step(x, sigma, sigma_next, history, order, i, n_steps, taylor_d2)
        if callback:
            callback(i, x, sigma_next)
    return x


def dpmpp_2m(denoiser, x: Tensor, sigmas: Tensor, callback: Callback = None, afs: bool = False, **cond: Any) -> Tensor:
    """DPM-Solver++(2M), 2nd-order multistep on the data prediction (Lu et al. 2022b, Alg. 2). NFE = N−1."""
    return _dpmpp_multistep(denoiser, x, sigmas, 2, callback, afs, **cond)


def dpmpp_3m(denoiser, x: Tensor, sigmas: Tensor, callback: Callback = None, afs: bool = False, **cond: Any) -> Tensor:
    """DPM-Solver++(3M) as in the DPM-Solver reference code and diffusers (Lu et al. 2022b). NFE = N−1."""
    return _dpmpp_multistep(denoiser, x, sigmas, 3, callback, afs, **cond)


def dpmpp_3m_taylor(denoiser, x: Tensor, sigmas: Tensor, callback: Callback = None, afs: bool = False,
                    **cond: Any) -> Tensor:
    """DPM-Solver++(3M) with the Taylor-consistent second-difference weight 2φ3 (3rd-order update). NFE = N−1."""
    return _dpmpp_multistep(denoiser, x, sigmas, 3, callback, afs, taylor_d2=True, **cond)


def euler_maruyama(denoiser, x: Tensor, sigmas: Tensor, callback: Callback = None, afs: bool = False,
                   generator: torch.Generator | PerSampleGenerator | None = None, **cond: Any) -> Tensor:
    """Euler–Maruyama on the reverse SDE in σ-space (Karras et al. 2022, eq. 6 with β = 1/σ):
    dx = 2ε̂ dσ + sqrt(2σ)·dω̄. NFE = N−1 (−1 with AFS); a last step to σ = 0 is x ← D, no noise."""
    for i, (sigma, sigma_next) in grid_steps(sigmas):
        d = first_eps(denoiser, x, sigma, afs and i == 0, **cond)
        d_sigma = sigma_next - sigma                             # < 0
        if sigma_next == 0:
            x = x + d_sigma * d
        else:
            x = x + 2 * d_sigma * d + math.sqrt(2 * sigma * -d_sigma) * randn_like(x, generator)
        if callback:
            callback(i, x, sigma_next)
    return x


SINGLESTEP_SOLVERS: dict[str, Solver] = {
    "euler": Solver(euler, one_per_step, order=1),
    "heun": Solver(heun, two_per_step, order=2),
    "dpm2": Solver(dpm2, two_per_step, order=2),
    "dpmpp_2m": Solver(dpmpp_2m, one_per_step, order=2),
    "dpmpp_3m": Solver(dpmpp_3m, one_per_step, order=3),               # nominal; see _dpmpp_multistep
    "dpmpp_3m_taylor": Solver(dpmpp_3m_taylor, one_per_step, order=3),
    "euler_maruyama": Solver(euler_maruyama, one_per_step, stochastic=True, order=1),   # weak order
}
