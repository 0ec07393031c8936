"""difflab: get more out of trained diffusion models, in one σ-space denoiser contract.

    D(x, sigma, **cond) -> x0_hat      x: [B, ...], sigma: [B]

The small, stable public API is re-exported here; everything else may change. Importing difflab
imports every method package, so each registers its saved kinds with `difflab.load`.
"""
__version__ = "0.1.0"

from difflab import amed, compose, condition, distill  # noqa: E402,F401  (register their saved kinds)
from difflab.core import CFGDenoiser, EDMDenoiser, FlowDenoiser, GaussianMixture, VPDenoiser, eps, fingerprint, score  # noqa: E402
from difflab.interop.diffusers import loader as _diffusers_loader  # noqa: E402,F401  (registers the format)
from difflab.models import load  # noqa: E402
from difflab.sampling import get_sigmas, sample, seeded_noise, sigmas_for_nfe  # noqa: E402

__all__ = ["__version__", "GaussianMixture", "EDMDenoiser", "VPDenoiser", "FlowDenoiser", "CFGDenoiser",
           "eps", "score", "fingerprint", "load", "get_sigmas", "sample", "seeded_noise", "sigmas_for_nfe"]
# and `DifflabScheduler` (below), left out of __all__ so that `from difflab import *` does not need diffusers


def __getattr__(name: str):
    """`difflab.DifflabScheduler`, imported on first use (it imports diffusers, which is slow and optional)."""
    if name == "DifflabScheduler":
        from difflab.interop.diffusers.scheduler import DifflabScheduler
        return DifflabScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
