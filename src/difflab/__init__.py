"""difflab: get more out of trained diffusion models, in one σ-space denoiser contract.

    D(x, sigma, **cond) -> x0_hat      x: [B, ...], sigma: [B]

The small, stable public API is re-exported here; everything else may change.
"""
__version__ = "0.1.0"

from .core import (CFGDenoiser, EDMDenoiser, FlowDenoiser, GaussianMixture, VPDenoiser, eps,  # noqa: E402
                   score)
from .models import load  # noqa: E402
from .sampling import get_sigmas, sample, seeded_noise, sigmas_for_nfe  # noqa: E402

__all__ = ["__version__", "GaussianMixture", "EDMDenoiser", "VPDenoiser", "FlowDenoiser", "CFGDenoiser",
           "eps", "score", "load", "get_sigmas", "sample", "seeded_noise", "sigmas_for_nfe"]
