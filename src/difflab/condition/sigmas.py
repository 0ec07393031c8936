"""Noise levels for the inverse-problem methods: DEFT's σ draws inside the range a base model accepts
(`difflab.sampling.grids.model_sigma_range`).

A model trained on a discrete table (a diffusers DDPM model: σ_t = sqrt((1 − ᾱ_t)/ᾱ_t), t = 0..T−1) declares
`sigma_min` / `sigma_max` and refuses any σ outside them (SigmaRangeError); an EDM model declares the range it
was trained on; the analytic mixture declares [0, ∞). Every σ that DEFT's fitting draws and every grid a
reconstruction uses lies inside that range (docs/methods/deft.md, "σ ranges").
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def truncated_log_normal(batch_size: int, generator: torch.Generator, p_mean: float, p_std: float,
                         sigma_range: tuple[float, float] = (0.0, math.inf), dtype: torch.dtype = torch.float32
                         ) -> Tensor:
    """σ with ln σ ~ N(p_mean, p_std²) truncated to ln `sigma_range`: [batch_size] on the generator's device.

    One standard normal z per σ, in `dtype` (the same draws as an untruncated sampler), mapped by the inverse
    CDF onto the truncated interval [a, b]: z' = Φ⁻¹(Φ(a) + Φ(z)(Φ(b) − Φ(a))); with no finite end, z' = z.
    """
    z = torch.randn(batch_size, generator=generator, device=generator.device, dtype=dtype)
    low, high = sigma_range
    if low <= 0 and math.isinf(high):
        return (p_mean + p_std * z).exp()
    a = (math.log(low) - p_mean) / p_std if low > 0 else -math.inf
    b = (math.log(high) - p_mean) / p_std if math.isfinite(high) else math.inf
    cdf_a, cdf_b = (torch.special.ndtr(torch.tensor(end, dtype=torch.float64)) for end in (a, b))
    u = cdf_a + torch.special.ndtr(z.double()) * (cdf_b - cdf_a)
    z = torch.special.ndtri(u).clamp(a, b)
    return (p_mean + p_std * z).exp().clamp(low, high).to(dtype)     # clamp: exp's round-off at the ends


__all__ = ["truncated_log_normal"]
