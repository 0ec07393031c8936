"""Linear multistep probability-flow ODE solvers in σ-space: iPNDM, iPNDM-v, exact variable-step AB, DEIS-tAB,
UniPC.

All spend one model evaluation per step and reuse the earlier ones. In σ-space the ODE is
dx/dσ = ε̂(x; σ), so an Adams–Bashforth step is x_{i+1} = x_i + ∫_{σ_i}^{σ_{i+1}} P dσ with P an
interpolant of the last few ε̂'s: iPNDM, iPNDM-v, `ab_variable` and DEIS-tAB differ only in the
weights this gives them (`_adams_bashforth`): fixed equal-step ones, the published step-ratio ones
of iPNDM-v, exact ones for P polynomial in σ, or for P polynomial in the VP time t. UniPC instead
works on the data prediction D = x − σ·ε̂ in λ = −log σ. A last step to σ = 0 is x ← D(x; σ_{N−2}), the
evaluation that step makes anyway.

Warm-up: every method starts at first order and raises its order as history accumulates, so the
first step's local error O(h²) bounds the *asymptotic* global order by 2 (3 for UniPC, whose
corrector lifts the first step to second order). That error is made where ε̂ hardly changes
(dε̂/dσ ~ s²/σ³, s the data scale) and the flow then contracts it by ~ s/σ_max, so from
σ_max ≫ s the methods show their nominal order over practical step counts (tests/sampling/
test_multistep.py measures it from σ_max = 80).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from difflab.core.errors import ConfigError
from difflab.sampling.steps import Callback, Solver, expm1_, first_eps, log_, one_per_step
from difflab.sampling.steps import lower_order_final as final_order

# Adams–Bashforth coefficients for equal steps (oldest last), orders 1–4: iPNDM's (Zhang & Chen
# 2023; docs/methods/solvers.md (15)): ∫_0^1 of the Lagrange basis through u = 0, −1, −2, −3.
AB_COEFFS: tuple[tuple[float, ...], ...] = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)

# Gauss–Legendre rule on [−1, 1]: 32 nodes integrate polynomials of degree ≤ 63 exactly, and the
# smooth DEIS integrand to round-off.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(32)

# VP-SDE time of DEIS's experiments (Song et al. 2021, β(t) = β_min + β_d·t):
# σ(t) = sqrt(exp(½β_d t² + β_min t) − 1), as in docs/methods/solvers.md (4) (time-uniform grids).
VP_BETA_MIN, VP_BETA_D = 0.1, 19.9


def vp_time(sigma: np.ndarray | float) -> np.ndarray:
    """The VP-SDE time t of a noise level σ: the root of ½β_d t² + β_min t = log(1 + σ²)."""
    log1p_sigma2 = np.log1p(np.square(sigma))
    return 2 * log1p_sigma2 / (VP_BETA_MIN + np.sqrt(VP_BETA_MIN**2 + 2 * VP_BETA_D * log1p_sigma2))


def lagrange_integrals(nodes: Sequence[float], sigma: float, sigma_next: float,
                       time: Callable[[np.ndarray], np.ndarray] | None = None) -> list[float]:
    """b_j = ∫_σ^{σ_next} ℓ_j(τ(s)) ds for the Lagrange basis ℓ_j through τ(nodes) (τ: identity or `time`).

    nodes: the k noise levels of the history, newest (= sigma) first. Then Σ_j b_j ε̂_j is the
    integral over the step of the degree-(k−1) interpolant of ε̂ in τ. With τ = σ the rule is
    exact (Gauss–Legendre, degree ≤ 63) and gives the variable-step Adams–Bashforth weights;
    with equal steps these are h·AB_COEFFS.
    """
    time = time or (lambda s: np.asarray(s, dtype=np.float64))
    half = (sigma_next - sigma) / 2
    s = sigma + half * (_GL_NODES + 1)                          # quadrature points in [σ, σ_next]
    tau, tau_nodes = time(s), time(np.asarray(nodes, dtype=np.float64))
    weights = []
    for j, tau_j in enumerate(tau_nodes):
        basis = np.ones_like(tau)
        for m, tau_m in enumerate(tau_nodes):
            if m != j:
                basis *= (tau - tau_m) / (tau_j - tau_m)
        weights.append(float(half * (_GL_WEIGHTS @ basis)))
    return weights


def ipndm_weights(nodes: Sequence, sigma, sigma_next) -> list:
    """iPNDM's b_j = (σ_next − σ)·c_j with the equal-step AB_COEFFS of order len(nodes) (σ's: floats
    or tensors broadcastable against the state)."""
    return [(sigma_next - sigma) * c for c in AB_COEFFS[len(nodes) - 1]]


def adams_bashforth_step(x: Tensor, sigma_list: Sequence[float], i: int, history: list[Tensor],
                         step_weights: Callable[[list[float], float, float], list[float]]) -> Tensor:
    """Step i of `_adams_bashforth`, σ_i → σ_{i+1}: x + Σ_j b_j ε̂_{i−j}.

    history: ε̂_i, ε̂_{i−1}, … (newest first); step_weights(nodes, σ_i, σ_{i+1}) -> b."""
    sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
    if sigma_next == 0:
        return x - sigma * history[0]                            # x ← D(x; σ): exact Euler step to σ = 0
    nodes = sigma_list[i::-1][: len(history)]                    # σ_i, σ_{i−1}, …
    b = step_weights(nodes, sigma, sigma_next)
    return x + sum(b_j * d_j for b_j, d_j in zip(b, history))


def _adams_bashforth(denoiser, x: Tensor, sigmas: Tensor, max_order: int,
                     step_weights: Callable[[list[float], float, float], list[float]],
                     callback: Callback, afs: bool, **cond: Any) -> Tensor:
    """x_{i+1} = x_i + Σ_j b_j ε̂_{i−j}, j < k = min(max_order, i + 1); b = step_weights(nodes, σ_i, σ_{i+1})."""
    sigma_list = sigmas.tolist()
    history: list[Tensor] = []                                   # ε̂_i, ε̂_{i−1}, … (newest first)
    for i, (sigma, sigma_next) in enumerate(zip(sigma_list[:-1], sigma_list[1:])):
        d = first_eps(denoiser, x, sigma, afs and i == 0, **cond)
        history = [d] + history[: max_order - 1]
        x = adams_bashforth_step(x, sigma_list, i, history, step_weights)
        if callback:
            callback(i, x, sigma_next)
    return x


def _check_order(name: str, order: int, highest: int) -> None:
    if int(order) != order or not 1 <= order <= highest:
        raise ConfigError(f"{name} must be an integer in 1..{highest}, got {order!r}")


def ipndm(denoiser, x: Tensor, sigmas: Tensor, callback: Callback = None, afs: bool = False,
          max_order: int = 4, **cond: Any) -> Tensor:
    """Improved PNDM (Zhang & Chen 2023; AMED paper §2): Adams–Bashforth on ε̂ with the fixed
    equal-step coefficients AB_COEFFS, order 1, 2, 3, 4 as history accumulates:
    x_{i+1} = x_i + (σ_{i+1} − σ_i)·Σ_j c_j ε̂_{i−j}.

    The coefficients assume equal steps in σ. On any other grid (Karras, logSNR) they miss the
    variable-step weights of `ab_variable` by O(r − 1) = O(h) (r the ratio of successive steps); times
    the O(h) differences of the ε̂'s and the step h that is a local error O(h³), so the global
    order is 2 there (measured 2.03 on a logSNR grid) and max_order only on a σ-uniform grid.

    x: [B, ...] at sigmas[0]; sigmas: [N] decreasing, may end at 0. Returns x at sigmas[-1].
    NFE = N − 1 (− 1 with AFS).
    """
    _check_order("max_order", max_order, len(AB_COEFFS))
    return _adams_bashforth(denoiser, x, sigmas, max_order, ipndm_weights, callback, afs, **cond)


def ab_variable(denoiser, x: Tensor, sigmas: Tensor, callback: Callback = None, afs: bool = False,
                max_order: int = 4, **cond: Any) -> Tensor:
    """The exact variable-step Adams–Bashforth method on ε̂ (= ρAB-DEIS, Zhang & Chen 2023, §4):
    ε̂ is interpolated by the Lagrange polynomial in σ through (σ_{i−j}, ε̂_{i−j}), j < k, and
    integrated exactly over [σ_i, σ_{i+1}]: b_j = ∫ ℓ_j(σ) dσ (`lagrange_integrals`). In closed form,
    with h = σ_{i+1} − σ_i and the nodes in step units u_j = (σ_{i−j} − σ_i)/h (u_0 = 0, u_1 = −1/r,
    r = h/(σ_i − σ_{i−1})):
      AB2: b = h·(1 + r/2, −r/2)
      AB3: b_j = h·∫_0^1 Π_{m≠j}(u − u_m)/(u_j − u_m) du, i.e. with a = u_1, c = u_2:
           b_0 = h(1/3 − (a + c)/2 + ac)/(ac), b_1 = h(1/3 − c/2)/(a(a − c)), b_2 = h(1/3 − a/2)/(c(c − a))
    and likewise AB4 (one formula for every order). Equal steps give back AB_COEFFS.
    Not the iPNDM-v of the AMED / diff-sampler code (that is `ipndm_v`, whose weights differ from
    these from the third order on); few-step accuracy differs accordingly (docs/methods/solvers.md).

    x: [B, ...] at sigmas[0]; sigmas: [N] decreasing, may end at 0. Returns x at sigmas[-1].
    Order max_order on any smooth grid (see the module note on warm-up). NFE = N − 1 (− 1 with AFS).
    """
    _check_order("max_order", max_order, 4)
    return _adams_bashforth(denoiser, x, sigmas, max_order, lagrange_integrals, callback, afs, **cond)


def ipndm_v_weights(nodes: Sequence[float], sigma: float, sigma_next: float) -> list[float]:
    """iPNDM-v's b_j (the diff-sampler code of Zhou et al. 2024 / Zhang & Chen 2023; docs/methods/
    solvers.md (16b)), written with the step sizes h_0 = σ_{i+1} − σ_i, h_m = σ_{i−m+1} − σ_{i−m}:

      b = h_0·[ε̂-weights of  ε̂_i + (r_1/2)·Δ_1 + g_2·Δ_2 + g_3·Δ_3 ]   (orders 2, 3, 4 add one term each)

    with the ratios r_m = h_{m−1}/h_m, Δ_1 = ε̂_i − ε̂_{i−1}, Δ_2 = Δ_1 − r_2·(ε̂_{i−1} − ε̂_{i−2}) and, with
    q = h_1(h_1 + h_2)/(h_2(h_2 + h_3)), Δ_3 = Δ_2 − q·(ε̂_{i−1} − (1 + r_3)·ε̂_{i−2} + r_2·ε̂_{i−3}) (the
    reference's last weight carries r_2 where a third difference would have r_3, so on uneven steps the
    order-4 weights do not sum to h_0: kept as published). The gains
      g_2 = ½(1 − h_0²/(3h_1(h_1 + h_2)))
      g_3 = [½(1 − h_0/(3H_1)) + (1 − h_0/(2H_1))·h_0/(6H_2)]·h_0H_1H_2/(h_1(h_1 + h_2)(h_1 + h_2 + h_3)),
    H_1 = h_0 + h_1, H_2 = H_1 + h_2. Equal steps give AB_COEFFS at orders 1–3 and (57, −65, 43, −11)/24
    at order 4 (not AB4's (55, −59, 37, −9)/24). nodes: σ_i, σ_{i−1}, … (newest first, 1–4 of them).
    """
    h = [sigma_next - sigma] + [newer - older for newer, older in zip(nodes[:-1], nodes[1:])]
    order = len(nodes)
    weights = [1.0] + [0.0] * (order - 1)
    if order >= 2:
        r_1 = h[0] / h[1]
        weights[0] += r_1 / 2                                    # (r_1/2)·Δ_1: exact variable-step AB2
        weights[1] -= r_1 / 2
    if order >= 3:
        r_2 = h[1] / h[2]
        gain_2 = (1 - h[0] ** 2 / (3 * h[1] * (h[1] + h[2]))) / 2
        for j, c in enumerate((1.0, -(1 + r_2), r_2)):           # g_2·Δ_2
            weights[j] += gain_2 * c
    if order >= 4:
        r_3, h_1 = h[2] / h[3], h[0] + h[1]
        h_2 = h_1 + h[2]
        q = h[1] * (h[1] + h[2]) / (h[2] * (h[2] + h[3]))
        gain_3 = (((1 - h[0] / (3 * h_1)) / 2 + (1 - h[0] / (2 * h_1)) * h[0] / (6 * h_2))
                  * h[0] * h_1 * h_2 / (h[1] * (h[1] + h[2]) * (h[1] + h[2] + h[3])))
        for j, c in enumerate((1.0, -(1 + r_2 + q), r_2 + q * (1 + r_3), -q * r_2)):   # g_3·Δ_3
            weights[j] += gain_3 * c
    return [h[0] * w for w in weights]


def ipndm_v(denoiser, x: Tensor, sigmas: Tensor, callback: Callback = None, afs: bool = False,
            max_order: int = 4, **cond: Any) -> Tensor:
    """iPNDM-v: iPNDM with step-ratio-dependent weights, as in the code of the AMED paper (Zhou et al.
    2024, diff-sampler) after Zhang & Chen 2023: x_{i+1} = x_i + Σ_j b_j ε̂_{i−j} with b from
    `ipndm_v_weights`, order 1, 2, 3, 4 as history accumulates. Its AB2 step is the exact variable-step
    one; from the third order on its weights are the published ones, not the exact variable-step
    integrals (those are `ab_variable`). At few steps on Karras grids it is the more accurate of the two
    (measured in tests/sampling/test_multistep.py).

    x: [B, ...] at sigmas[0]; sigmas: [N] decreasing, may end at 0. Returns x at sigmas[-1].
    NFE = N − 1 (− 1 with AFS).
    """
    _check_order("max_order", max_order, 4)
    return _adams_bashforth(denoiser, x, sigmas, max_order, ipndm_v_weights, callback, afs, **cond)


def deis(denoiser, x: Tensor, sigmas: Tensor, callback: Callback = None, afs: bool = False,
         order: int = 3, **cond: Any) -> Tensor:
    """DEIS-tAB (Zhang & Chen 2023, §4): the exponential integrator with ε̂ extrapolated by a Lagrange
    polynomial in the diffusion time t through the last `order` points, integrated exactly.

    σ-space (VE) form: after the rescaling x_σ = x_vp/α the transition Ψ is the identity and the
    weight ½GGᵀL⁻ᵀ becomes dσ/dt, so the tAB update reads x_{i+1} = x_i + Σ_j C_ij ε̂_{i−j} with
    C_ij = ∫_{t_i}^{t_{i+1}} ℓ_j(t) σ'(t) dt = ∫_{σ_i}^{σ_{i+1}} ℓ_j(t(σ)) dσ, t the VP-SDE time of
    DEIS's experiments (β_min = 0.1, β_d = 19.9). With t = σ this would be ρAB-DEIS = `ab_variable`.

    x: [B, ...] at sigmas[0]; sigmas: [N] decreasing, may end at 0. Returns x at sigmas[-1].
    Order `order` (≤ 4). NFE = N − 1 (− 1 with AFS).
    """
    _check_order("order", order, 4)
    return _adams_bashforth(denoiser, x, sigmas, order, deis_weights, callback, afs, **cond)


def deis_weights(nodes: list[float], sigma: float, sigma_next: float) -> list[float]:
    """DEIS-tAB's C_ij: the Lagrange basis in the VP-SDE time t, integrated over [σ_i, σ_{i+1}] (see `deis`)."""
    return lagrange_integrals(nodes, sigma, sigma_next, time=vp_time)


# ----- UniPC -------------------------------------------------------------------------------------
def _unipc_weights(h, ratios: Sequence) -> list:
    """ρ for UniP-p / UniC-p with B(h) = e^{−h} − 1 ("bh2", the paper's expm1(h) with h → −h for
    the data prediction; Zhao et al. 2023).

    ratios r_m = (λ_{i−m} − λ_i)/h of the earlier points (and, for the corrector, r = 1 for the
    new one). ρ solves Σ_m ρ_m r_m^{k−1} = k!·(−h)φ_{k+1}(−h)/B(h), k = 1..len(ratios), the
    order conditions R_p ρ = g_p/B(h) of the paper, φ_1(z) = expm1(z)/z, φ_{k+1}(z) = (φ_k(z) − 1/k!)/z.
    With one unknown the paper fixes ρ = ½ (equal to the solution up to O(h), enough for the order).
    h and the ratios are floats, or tensors of one shape (per-sample grids): one solve per element.
    """
    if len(ratios) == 1:
        return [0.5]
    z = -torch.as_tensor(h, dtype=torch.float64)
    b_h = torch.expm1(z)
    phi, factorial, g = torch.expm1(z) / z, 1, []
    for k in range(1, len(ratios) + 1):
        phi = (phi - 1 / factorial) / z                          # φ_{k+1}(z)
        g.append(factorial * z * phi / b_h)                      # k!·zφ_{k+1}(z)/B(h)
        factorial *= k + 1
    r = torch.stack(torch.broadcast_tensors(*[torch.as_tensor(r_m, dtype=torch.float64) for r_m in ratios]), -1)
    vandermonde = torch.stack([r**k for k in range(len(ratios))], -2)          # [..., k, m] = r_m^k
    rho = torch.linalg.solve(vandermonde, torch.stack(torch.broadcast_tensors(*g), -1).expand(r.shape))
    if not isinstance(h, Tensor):
        return rho.tolist()
    return [rho_m.to(h.dtype) for rho_m in rho.unbind(-1)]


def unipc_update(x: Tensor, sigma, sigma_next, x0_hats: list[tuple[Any, Tensor]], order: int,
                 x0_hat_next: Tensor | None = None) -> Tensor:
    """One UniP-p step from (σ, x), or with x0_hat_next the UniC-p correction of its result.

    x0_hats: [(σ_j, D_j)] newest last, the last one at σ; σ's are floats or tensors broadcastable
    against x ([B, 1, …]: per-sample grids, as in AMED-Plugin). The paper's data-prediction update,
    in VP variables (x_vp = α·x, σ_vp = α·σ, λ = log(α/σ_vp) = −log σ, h = λ_next − λ > 0), is
      x_vp' = (σ_vp'/σ_vp)·x_vp − α'·(e^{−h} − 1)·D_0 − α'·B(h)·Σ_m ρ_m·(D_m − D_0)/r_m.
    Since (σ_vp'/σ_vp)·x_vp = α'·(σ'/σ)·x, every term carries α' and dividing by it gives the
    σ-space form (α = 1), with B(h) = e^{−h} − 1:
      x' = (σ'/σ)·x − (e^{−h} − 1)·D_0 − B(h)·Σ_m ρ_m·(D_m − D_0)/r_m
    whose first two terms alone are DDIM (= DPM-Solver++1). The corrector adds the new point's
    difference D_next − D_0 at r = 1 to the sum.
    """
    sigma_0, x0_hat = x0_hats[-1]
    h = log_(sigma_0) - log_(sigma_next)
    earlier = x0_hats[-order:-1][::-1] if order > 1 else []     # D_{i−1}, D_{i−2}, …
    ratios = [(log_(sigma_0) - log_(sigma_m)) / h for sigma_m, _ in earlier]
    diffs = [(x0_m - x0_hat) / r_m for r_m, (_, x0_m) in zip(ratios, earlier)]
    if x0_hat_next is not None:                                  # UniC-p: p − 1 earlier points + the new one
        ratios, diffs = ratios + [1.0], diffs + [x0_hat_next - x0_hat]
    x = (sigma_next / sigma) * x - expm1_(-h) * x0_hat
    if diffs:
        rho = _unipc_weights(h, ratios)
        x = x - expm1_(-h) * sum(rho_m * d_m for rho_m, d_m in zip(rho, diffs))
    return x


def unipc(denoiser, x: Tensor, sigmas: Tensor, callback: Callback = None, afs: bool = False,
          order: int = 3, lower_order_final: bool = True, **cond: Any) -> Tensor:
    """UniPC, B(h) = expm1(h) ("bh2") variant, data prediction (Zhao et al. 2023: the UniP-p
    predictor and the UniC-p corrector, multistep), in σ-space with λ = −log σ.

    Step i: evaluate D_i at the predicted x_i; correct x_i with UniC (using D_i, which is not
    re-evaluated at the corrected point: one evaluation per step); predict x_{i+1} with UniP of
    order min(order, i + 1). With fewer than LOWER_ORDER_FINAL_BELOW steps and lower_order_final,
    step i's order is also at most N − 1 − i (the last step first order), as diffusers does.
    No corrector after the last step; a last step to σ = 0 is x ← D. `callback` sees the
    predicted state (the corrected one exists only after the next evaluation).

    Matches diffusers' UniPCMultistepScheduler(predict_x0=True, solver_type="bh2") on the same
    grid, with its lower_order_final=True below 15 steps and =False from 15 on.
    x: [B, ...] at sigmas[0]; sigmas: [N] decreasing, may end at 0. Returns x at sigmas[-1].
    `order` ≤ 3 is UniP's; UniC raises it by one (measured global order 3.7–4 for order 3, 3.0
    for order 2). NFE = N − 1 (− 1 with AFS).
    """
    _check_order("order", order, 3)
    sigma_list = sigmas.tolist()
    state = UniPCState()
    for i, (sigma, sigma_next) in enumerate(zip(sigma_list[:-1], sigma_list[1:])):
        x0_hat = x - sigma * first_eps(denoiser, x, sigma, afs and i == 0, **cond)   # D = x − σ·ε̂
        x, state = unipc_step(x, x0_hat, sigma_list, i, state, order, lower_order_final)
        if callback:
            callback(i, x, sigma_next)
    return x


@dataclass(frozen=True)
class UniPCState:
    """What UniPC carries between steps: the last D's [(σ_j, D_j)] newest last, and the previous step's
    start (x, σ) and order for its UniC correction (x None before the first step)."""

    x0_hats: tuple[tuple[Any, Tensor], ...] = ()
    x_prev: Tensor | None = None
    sigma_prev: float = 0.0
    order_prev: int = 0


def unipc_step(x: Tensor, x0_hat: Tensor, sigma_list: Sequence[float], i: int, state: UniPCState, order: int = 3,
               lower_order_final: bool = True) -> tuple[Tensor, UniPCState]:
    """Step i of `unipc`, σ_i → σ_{i+1}, given the predicted x at σ_i and D_i = D(x; σ_i): UniC-p corrects the
    previous step with D_i (from its own start, as diffusers does), then UniP-p predicts x_{i+1}. A step to σ = 0
    is x ← D_i. Returns (x_{i+1}, the new state). The order grows with the D's held (from 1 after a fresh state)."""
    sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
    if sigma_next == 0:
        return x0_hat, state                                     # last step to σ = 0: x ← D
    if state.x_prev is not None:                                 # UniC-p on the previous step
        x = unipc_update(state.x_prev, state.sigma_prev, sigma, list(state.x0_hats), state.order_prev,
                         x0_hat_next=x0_hat)
    x0_hats = (*state.x0_hats, (sigma, x0_hat))[-order:]
    step_order = len(x0_hats)
    if lower_order_final:
        step_order = final_order(step_order, i, len(sigma_list) - 1)
    x_next = unipc_update(x, sigma, sigma_next, list(x0_hats), step_order)   # UniP-p
    return x_next, UniPCState(x0_hats, x, sigma, step_order)


MULTISTEP_SOLVERS: dict[str, Solver] = {
    "ipndm": Solver(ipndm, one_per_step, order=4),              # 4 on σ-uniform grids, 2 on others
    "ipndm_v": Solver(ipndm_v, one_per_step, order=3),          # measured 2.9–3.0 on logSNR grids; < 2 on Karras
    "ab_variable": Solver(ab_variable, one_per_step, order=4),
    "deis": Solver(deis, one_per_step, order=3),
    "unipc": Solver(unipc, one_per_step, order=3),              # UniP order; with UniC ≈ 4 measured
}
