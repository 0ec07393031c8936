"""Time grids: decreasing noise levels σ_0 = σ_max > … > σ_{n−1} = σ_min, no appended zero."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from difflab.core.errors import ConfigError, SigmaRangeError, UnknownNameError


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Polynomial grid (Karras et al. 2022, eq. 5): σ_i = (σmax^{1/ρ} + i/(n−1)(σmin^{1/ρ} − σmax^{1/ρ}))^ρ."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho


def logsnr(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Uniform in log σ (= uniform in logSNR, up to sign and factor 2): exp(linspace(log σmax, log σmin, n))."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


VP_EPS_S = 1e-3  # the smallest VP time of the time-uniform / time-quadratic grids (Song et al. 2021's ε_s)


def vp_beta(sigma_min: float, sigma_max: float, eps_s: float = VP_EPS_S) -> tuple[float, float]:
    """(β_d, β_min) of the VP-SDE σ(τ) = sqrt(exp(½β_d τ² + β_min τ) − 1) with σ(1) = σmax, σ(ε_s) = σmin.

    log(1 + σ²) = ½β_d τ² + β_min τ is linear in (β_d, β_min): two equations, one at each end.
    """
    log_max, log_min = math.log1p(sigma_max**2), math.log1p(sigma_min**2)
    beta_d = 2 * (log_min - eps_s * log_max) / (eps_s**2 - eps_s)   # eliminate β_min: (ε_s·eq1 − eq2)
    return beta_d, log_max - beta_d / 2


def _vp_time(n: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """τ_i = (1 + i/(n−1)(ε_s^{1/ρ} − 1))^ρ in VP time, mapped to σ(τ) = sqrt(exp(½β_d τ² + β_min τ) − 1)."""
    beta_d, beta_min = vp_beta(sigma_min, sigma_max)
    # dσ²/dτ ∝ β_d τ + β_min must stay > 0 on [ε_s, 1]; it is linear in τ, so both ends decide
    if min(beta_d * VP_EPS_S + beta_min, beta_d + beta_min) <= 0:
        raise SigmaRangeError(f"no increasing VP schedule maps [{VP_EPS_S}, 1] onto [{sigma_min}, {sigma_max}]; "
                              "use a larger sigma_max/sigma_min ratio or another grid")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    tau = (1 + ramp * (VP_EPS_S ** (1 / rho) - 1)) ** rho
    return torch.expm1(beta_d / 2 * tau**2 + beta_min * tau).sqrt()


def time_uniform(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Uniform in VP time τ ∈ [ε_s, 1] (DDIM / DPM-Solver "time_uniform"); `rho` is ignored (fixed at 1)."""
    return _vp_time(n, sigma_min, sigma_max, 1.0)


def time_quadratic(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Uniform in sqrt(τ) (DDIM's "quadratic" skip type); `rho` is ignored (fixed at 2)."""
    return _vp_time(n, sigma_min, sigma_max, 2.0)


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def alphas_cumprod_for(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                       trained_betas: list[float] | None = None) -> Tensor:
    """ᾱ_t = Π_{s≤t}(1 − β_s) for a DDPM β schedule, [T] float64.

    linear: β linear in t (Ho et al. 2020); scaled_linear: sqrt(β) linear in t (Stable Diffusion);
    squaredcos_cap_v2: the cosine schedule ᾱ(τ) ∝ cos²((τ + s)/(1 + s)·π/2), s = 0.008, with
    β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0.999) (Nichol & Dhariwal 2021, eq. 17).
    """
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float64)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        f = lambda tau: math.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        T = num_train_timesteps
        betas = torch.tensor([min(1 - f((t + 1) / T) / f(t / T), 0.999) for t in range(T)], dtype=torch.float64)
    else:
        raise UnknownNameError(f"unknown beta_schedule {beta_schedule!r}; choose one of {list(BETA_SCHEDULES)}")
    return torch.cumprod(1 - betas, 0)


def ddpm_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """ᾱ_t of the linear-β DDPM schedule (Ho et al. 2020). [T] float64."""
    return alphas_cumprod_for(num_train_timesteps, beta_start, beta_end, "linear")


def discrete_timesteps(num_timesteps: int, n: int) -> Tensor:
    """n integer timesteps from T−1 down to 0, uniformly spaced: round((T−1)(1 − i/(n−1))).

    Rounding is to the nearest integer, halves to even (torch.round); for n <= T the timesteps are
    distinct, so the grid is strictly decreasing. [n] int64, decreasing.
    """
    if n > num_timesteps:
        raise ConfigError(f"cannot pick n={n} distinct timesteps from a table of {num_timesteps}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return ((num_timesteps - 1) * (1 - ramp)).round().long()


def discrete_sigmas(alphas_cumprod: Tensor, n: int) -> Tensor:
    """n table noise levels σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) at uniformly spaced timesteps, from the top down.

    alphas_cumprod: [T] (decreasing in t). The timesteps are `discrete_timesteps(T, n)`: the first
    is T−1 (σ_max of the table), the last 0 (σ_min), the rest rounded to the nearest integer.
    Returns [n] float64, strictly decreasing.
    """
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    table = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    return table[discrete_timesteps(len(table), n)]


def discrete(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """`discrete_sigmas` on the default DDPM table (linear β, T = 1000), restricted to its timesteps
    whose σ lies in [sigma_min, sigma_max] (relative tolerance 1e-6); `rho` is ignored."""
    table = ((1 - ddpm_alphas_cumprod()) / ddpm_alphas_cumprod()).sqrt()
    inside = torch.nonzero((table >= sigma_min * (1 - 1e-6)) & (table <= sigma_max * (1 + 1e-6))).flatten()
    if len(inside) < n:
        raise SigmaRangeError(f"the DDPM table has {len(inside)} timesteps with sigma in [{sigma_min}, {sigma_max}] "
                              f"(its range is [{float(table[0]):.4g}, {float(table[-1]):.4g}]); need n={n}")
    return table[int(inside[0]):int(inside[-1]) + 1][discrete_timesteps(len(inside), n)]


MAX_GRID_POINTS = 100_000   # far beyond any sampler (EDM uses 18-256); refuses n = 10**9 before allocating it

GRIDS = {"karras": karras, "polynomial": karras, "logsnr": logsnr, "time_uniform": time_uniform,
         "time_quadratic": time_quadratic, "discrete": discrete}


def get_sigmas(kind: str, n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """A decreasing grid of `n` noise levels from sigma_max to sigma_min: [n] float64.

    kind: "karras" (alias "polynomial", exponent rho), "logsnr", "time_uniform" / "time_quadratic"
    (VP time, ρ = 1 / 2), or "discrete" (the default DDPM table's levels inside [sigma_min,
    sigma_max]; for another model's table use `discrete_sigmas(alphas_cumprod, n)`).
    """
    if kind not in GRIDS:
        raise UnknownNameError(f"unknown grid {kind!r}; choose one of {sorted(GRIDS)}")
    if int(n) != n or not 2 <= n <= MAX_GRID_POINTS:
        raise ConfigError(f"a grid needs n >= 2 noise levels (and at most {MAX_GRID_POINTS:,}), got n={n}")
    if not 0 < sigma_min < sigma_max < math.inf:
        raise SigmaRangeError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ConfigError(f"rho must be a finite number > 0 (7 is Karras et al.'s choice), got {rho!r}")
    return GRIDS[kind](int(n), float(sigma_min), float(sigma_max), float(rho))


RANGE_TOLERANCE = 1e-5   # relative: the float32 round-off of a table's end points (as check_grid allows)
EDM_RANGE = (0.002, 80.0)   # the default grid ends (Karras et al. 2022), clipped to a model's own range


def _declared(model: Any) -> tuple[float, float]:
    """The model's declared [sigma_min, sigma_max]; [0, ∞) where it declares none."""
    low, high = getattr(model, "sigma_min", None), getattr(model, "sigma_max", None)
    return (0.0 if low is None else float(low)), (math.inf if high is None else float(high))


def model_sigma_range(model: Any, sigma_min: float | None = None, sigma_max: float | None = None,
                      default: tuple[float, float] = (0.0, math.inf)) -> tuple[float, float]:
    """The σ range [low, high] to use with `model`: each end as asked, or (None) the model's declared end
    clipped to `default`'s. Raises SigmaRangeError, naming both ranges, when an asked end is not finite and
    positive, or the range is empty or leaves the model's (call it before any work: a table model would
    refuse such a σ mid-run)."""
    model_low, model_high = _declared(model)
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if value is not None and not 0 < float(value) < math.inf:
            raise SigmaRangeError(f"{name} must be a finite number > 0, got {value}; "
                                  f"the model's range is [{model_low:.4g}, {model_high:.4g}]")
    low = max(model_low, default[0]) if sigma_min is None else float(sigma_min)
    high = min(model_high, default[1]) if sigma_max is None else float(sigma_max)
    asked = f"the sigma range [{low:.4g}, {high:.4g}]"
    model_text = f"the model's range [{model_low:.4g}, {model_high:.4g}]"
    if not 0 <= low < high:
        raise SigmaRangeError(f"{asked} is empty; choose sigma_min < sigma_max inside {model_text}")
    if low < model_low * (1 - RANGE_TOLERANCE) or high > model_high * (1 + RANGE_TOLERANCE):
        raise SigmaRangeError(f"{asked} is outside {model_text}; pass sigma_min / sigma_max inside it "
                              "(or leave them unset to use the model's)")
    return max(low, model_low), min(high, model_high)


def check_grid(sigmas: Tensor, sigma_min: float | None = None, sigma_max: float | None = None) -> Tensor:
    """Validate a grid: 1-D, >= 2 points, strictly decreasing, positive except a final 0, in range."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ConfigError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    if not bool(torch.isfinite(sigmas).all()) or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ConfigError(f"sigmas must be finite and strictly decreasing, got {sigmas.tolist()}")
    positive = sigmas[:-1] if float(sigmas[-1]) == 0 else sigmas
    if not bool((positive > 0).all()):
        raise SigmaRangeError(f"noise levels must be > 0 (only the last may be exactly 0), got {sigmas.tolist()}")
    tol = 1e-5
    if sigma_max is not None and float(sigmas[0]) > sigma_max * (1 + tol):
        raise SigmaRangeError(f"the grid starts at sigma={float(sigmas[0]):.4g}, "
                              f"above the model's sigma_max={sigma_max:.4g}")
    if sigma_min is not None and float(positive[-1]) < sigma_min * (1 - tol):
        raise SigmaRangeError(f"the grid reaches sigma={float(positive[-1]):.4g}, "
                              f"below the model's sigma_min={sigma_min:.4g}")
    return sigmas


def points_for_nfe(nfe: int, nfe_of_points, solver: str, max_points: int = 10_000) -> int:
    """The number of grid points n for which a solver spends exactly `nfe` evaluations.

    nfe_of_points: n -> NFE. Raises ConfigError naming the nearest budgets the solver can spend.
    """
    if int(nfe) != nfe or nfe < 1:
        raise ConfigError(f"nfe must be a positive integer, got {nfe}")
    for n in range(2, max_points):
        spent = nfe_of_points(n)
        if spent == nfe:
            return n
        if spent > nfe:
            below = nfe_of_points(n - 1) if n > 2 else None
            raise ConfigError(f"solver {solver!r} cannot spend exactly {nfe} evaluations; "
                              f"nearest budgets: {below} or {spent}")
    raise ConfigError(f"nfe={nfe} is too large")
