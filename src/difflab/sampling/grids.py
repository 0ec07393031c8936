"""Time grids: decreasing noise levels σ_0 = σ_max > … > σ_{n−1} = σ_min, no appended zero."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError, SigmaRangeError, UnknownNameError


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Polynomial grid (Karras et al. 2022, eq. 5): σ_i = (σmax^{1/ρ} + i/(n−1)(σmin^{1/ρ} − σmax^{1/ρ}))^ρ."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_rho_min, inv_rho_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_rho_max + ramp * (inv_rho_min - inv_rho_max)) ** rho


def logsnr(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Uniform in log σ (= uniform in logSNR, up to sign and factor 2): exp(linspace(log σmax, log σmin, n))."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


GRIDS = {"karras": karras, "polynomial": karras, "logsnr": logsnr}


def get_sigmas(kind: str, n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """A decreasing grid of `n` noise levels from sigma_max to sigma_min: [n] float64.

    kind: "karras" (alias "polynomial", exponent rho) or "logsnr".
    """
    if kind not in GRIDS:
        raise UnknownNameError(f"unknown grid {kind!r}; choose one of {sorted(GRIDS)}")
    if int(n) != n or n < 2:
        raise ConfigError(f"a grid needs n >= 2 noise levels, got n={n}")
    if not 0 < sigma_min < sigma_max < math.inf:
        raise SigmaRangeError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return GRIDS[kind](int(n), float(sigma_min), float(sigma_max), rho)


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
        raise SigmaRangeError(f"the grid starts at sigma={float(sigmas[0]):.4g}, above the model's sigma_max={sigma_max:.4g}")
    if sigma_min is not None and float(positive[-1]) < sigma_min * (1 - tol):
        raise SigmaRangeError(f"the grid reaches sigma={float(positive[-1]):.4g}, below the model's sigma_min={sigma_min:.4g}")
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
