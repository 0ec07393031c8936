"""The noise schedule of guided distillation, written in σ-space (docs/methods/distillation.md (1)–(2)).

The paper works in variance-preserving (VP) notation, z_t = α_t x + σ_t ε with α_t² + σ_t² = 1 and
logSNR λ_t = log(α_t²/σ_t²). difflab's σ-space state is x_σ = z_t/α_t with noise level
σ = σ_t/α_t = e^{−λ/2}, so that

    α = 1/sqrt(1 + σ²),   σ_vp = σ·α,   λ = −2 log σ,   SNR = e^λ = 1/σ²,   z = α·x_σ.

The cosine logSNR schedule λ(u) = −2 log tan(a·u + b) is then simply σ(u) = tan(a·u + b): with
θ = arctan σ, σ(u) = tan(θ_min + u·(θ_max − θ_min)). The paper's a, b clip λ to [−20, 20]; here
the ends are the model's [σ_min, σ_max], and a sampling grid ends at σ(0) = 0 exactly (θ_min = 0),
so the last step of every sampler returns the denoised image.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from difflab.core.errors import ConfigError, SigmaRangeError


def cosine_sigma(u: Tensor | float, sigma_max: float, sigma_min: float = 0.0) -> Tensor:
    """σ(u) = tan(θ_min + u·(θ_max − θ_min)), θ = arctan σ: the cosine logSNR schedule in σ-space.

    u: float or tensor in [0, 1] (u = 0 → sigma_min, u = 1 → sigma_max). Returns a float64 tensor
    shaped like u.
    """
    if not 0 <= sigma_min < sigma_max < math.inf:
        raise SigmaRangeError(f"need 0 <= sigma_min < sigma_max < inf, got sigma_min={sigma_min}, "
                              f"sigma_max={sigma_max}")
    theta_min, theta_max = math.atan(sigma_min), math.atan(sigma_max)
    u = torch.as_tensor(u, dtype=torch.float64)
    return torch.tan(theta_min + u * (theta_max - theta_min))


def student_sigmas(steps: int, sigma_max: float) -> Tensor:
    """The N-step grid σ(i/N), i = N, …, 0: [N + 1] float64, decreasing from sigma_max to exactly 0.

    A student distilled for N steps is evaluated at its first N points; its teacher (2N steps) at
    `student_sigmas(2N, sigma_max)`, which holds these points and the midpoints in u between them.
    """
    if int(steps) != steps or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    u = torch.arange(int(steps), -1, -1, dtype=torch.float64) / steps
    sigmas = cosine_sigma(u, sigma_max)
    sigmas[-1] = 0.0   # tan(0) is 0 already; written out so the end is exact whatever the libm
    return sigmas


def training_sigmas(batch_size: int, generator: torch.Generator, sigma_min: float, sigma_max: float,
                    device: torch.device | str = "cpu") -> Tensor:
    """σ = σ(u), u ~ U[0, 1] on the cosine schedule between the model's sigma_min and sigma_max: [B] float32."""
    u = torch.rand(batch_size, generator=generator, device=generator.device, dtype=torch.float64)
    return cosine_sigma(u.cpu(), sigma_max, sigma_min).float().to(device)


def truncated_snr_weight(sigma: Tensor) -> Tensor:
    """max(SNR, 1) = max(1/σ², 1) (Salimans & Ho 2022, "truncated SNR" weighting). sigma: [B] > 0."""
    return torch.clamp(sigma.reciprocal().square(), min=1.0)


__all__ = ["cosine_sigma", "student_sigmas", "training_sigmas", "truncated_snr_weight"]
