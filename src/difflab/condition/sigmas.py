"""Noise levels for the inverse-problem methods: the σ range a base model accepts, and DEFT's σ draws in it.

A model trained on a discrete table (a diffusers DDPM model: σ_t = sqrt((1 − ᾱ_t)/ᾱ_t), t = 0..T−1) declares
`sigma_min` / `sigma_max` and refuses any σ outside them (SigmaRangeError); an EDM model declares the range it
was trained on; the analytic mixture declares [0, ∞). Every σ that DEFT's fitting draws and every grid a
reconstruction uses lies inside that range (docs/methods/deft.md, "σ ranges").
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from difflab.core.errors import SigmaRangeError

RANGE_TOLERANCE = 1e-5   # relative: the float32 round-off of a table's end points (as check_grid allows)


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


__all__ = ["model_sigma_range", "truncated_log_normal"]
