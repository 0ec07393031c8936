"""DPS and ΠGDM: training-free posterior guidance through the base network (docs/methods/deft.md (7)–(10)).

Both are denoiser wrappers, so every solver of `difflab.sampling` runs them unchanged:

    D_guided(x; σ) = D(x; σ) + J(x)ᵀ v(x̂0, y, σ),     J = ∂D/∂x (one VJP through the base network)

which is the posterior denoiser x + σ²·(∇ log p_σ(x) + ∇ log p̃(y | x)) for the likelihood
approximation p̃ whose gradient is σ²-scaled Jᵀ v:

- **DPS** (Chung et al. 2023, Alg. 1): p(y | x_σ) ≈ p(y | x̂0) with DPS's normalised step
  ζ_i = ζ/‖y − A(x̂0)‖, i.e. D moves by −ζ·∇_x ‖y − A(D(x))‖:
      v = ζ · Aᵀ(y − A(x̂0)) / ‖y − A(x̂0)‖                       (per sample)
  A solver step σ → σ' moves x by (1 − σ'/σ) times the shift of D, so the total guidance over a
  trajectory is ≈ ζ·ln(σ_max/σ_min) whatever the step count. Default ζ = 0.3 (digits, 8×8).
- **ΠGDM** (Song et al. 2023, eq. 7–8): p(y | x_σ) ≈ N(y; A x̂0, r_σ² A Aᵀ + σ_y² I) with
  r_σ² = σ²σ_d²/(σ² + σ_d²), the posterior variance of x0 under a N(·, σ_d² I) prior:
      v = w · σ² · Aᵀ (r_σ² A Aᵀ + σ_y² I)⁻¹ (y − A x̂0)
  exact for a Gaussian prior of variance σ_d² when w = 1 (the tests check this). Default w = 1.

Non-linear operators use their `adjoint` (surrogate or exact Jacobian transpose, see operators.py).
Guidance needs a gradient through the base network: these wrappers enable autograd internally,
even under torch.no_grad(), and return detached tensors.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from difflab.condition.operators import Operator
from difflab.core.denoiser import append_dims
from difflab.core.errors import ConfigError, ShapeError


def dps_direction(operator: Operator, x0_hat: Tensor, y: Tensor, zeta: float) -> Tensor:
    """DPS's v = −ζ ∇_x̂0 ‖y − A(x̂0)‖ = ζ Aᵀ r/‖r‖, r = y − A(x̂0) (Chung et al. 2023, Alg. 1 line 7)."""
    residual = y - operator(x0_hat)
    norm = residual.flatten(1).norm(dim=1).clamp_min(1e-12)
    return zeta * operator.adjoint(residual, x0_hat) / append_dims(norm, x0_hat.ndim)


def pigdm_variance(sigma: Tensor, sigma_data: float) -> Tensor:
    """r_σ² = σ²σ_d²/(σ² + σ_d²): Var[x0 | x_σ] under a N(·, σ_d² I) prior (ΠGDM's r_t², σ-space)."""
    return sigma**2 * sigma_data**2 / (sigma**2 + sigma_data**2)


def pigdm_direction(operator: Operator, x0_hat: Tensor, y: Tensor, sigma: Tensor, sigma_data: float,
                    weight: float) -> Tensor:
    """ΠGDM's v = w σ² Aᵀ(r_σ² A Aᵀ + σ_y² I)⁻¹(y − A x̂0) (Song et al. 2023, eq. 8). sigma: [B]."""
    residual = y - operator(x0_hat)
    solved = operator.gram_solve(residual, pigdm_variance(sigma, sigma_data))
    return weight * append_dims(sigma, x0_hat.ndim) ** 2 * operator.adjoint(solved, x0_hat)


class GuidedDenoiser(nn.Module):
    """D(x; σ) + J(x)ᵀ v for a guidance direction v (subclasses: DPS, PiGDM).

    Call as D(x, sigma, y=y, **cond): x: [B, ...], sigma: [B], y: the measurement [B, ...].
    """

    def __init__(self, base: nn.Module, operator: Operator):
        super().__init__()
        self.base, self.operator = base, operator
        self.sigma_min = getattr(base, "sigma_min", None)
        self.sigma_max = getattr(base, "sigma_max", None)
        self.data_shape = getattr(base, "data_shape", None)

    def direction(self, x0_hat: Tensor, y: Tensor, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor, y: Tensor | None = None, **cond: Any) -> Tensor:
        if y is None:
            raise ConfigError(f"{type(self).__name__} needs the measurement: call it with y=...")
        if y.shape[0] != x.shape[0]:
            raise ShapeError(f"y has batch {y.shape[0]}, x has {x.shape[0]}")
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            x0_hat = self.base(x_in, sigma, **cond)
            v = self.direction(x0_hat.detach(), y, sigma)
            (vjp,) = torch.autograd.grad(x0_hat, x_in, grad_outputs=v)       # Jᵀ v through the base
        return (x0_hat + vjp).detach()


class DPS(GuidedDenoiser):
    """DPS as a denoiser (module docstring): D − ζ ∇_x ‖y − A(D(x))‖. zeta: the step size ζ."""

    def __init__(self, base: nn.Module, operator: Operator, zeta: float = 0.3):
        super().__init__(base, operator)
        if not zeta > 0:
            raise ConfigError(f"DPS step size zeta must be > 0, got {zeta}")
        self.zeta = float(zeta)

    def direction(self, x0_hat: Tensor, y: Tensor, sigma: Tensor) -> Tensor:
        return dps_direction(self.operator, x0_hat, y, self.zeta)


class PiGDM(GuidedDenoiser):
    """ΠGDM as a denoiser (module docstring). weight: w (1 = the Gaussian-exact term);
    sigma_data: σ_d of r_σ² (default the base's sigma_data, else 0.5)."""

    def __init__(self, base: nn.Module, operator: Operator, weight: float = 1.0, sigma_data: float | None = None):
        super().__init__(base, operator)
        if not weight > 0:
            raise ConfigError(f"ΠGDM weight must be > 0, got {weight}")
        self.weight = float(weight)
        self.sigma_data = float(sigma_data if sigma_data is not None else getattr(base, "sigma_data", 0.5))

    def direction(self, x0_hat: Tensor, y: Tensor, sigma: Tensor) -> Tensor:
        return pigdm_direction(self.operator, x0_hat, y, sigma, self.sigma_data, self.weight)


__all__ = ["GuidedDenoiser", "DPS", "PiGDM", "dps_direction", "pigdm_direction", "pigdm_variance"]
