"""The denoiser contract, its wrappers and the analytic Gaussian mixture."""
from .denoiser import Denoiser, append_dims, eps, last_feature, score, sigma_batch
from .mixture import GaussianMixture
from .wrappers import CFGDenoiser, EDMDenoiser, FlowDenoiser, VPDenoiser

__all__ = ["Denoiser", "append_dims", "eps", "score", "sigma_batch", "last_feature", "GaussianMixture",
           "EDMDenoiser", "VPDenoiser", "FlowDenoiser", "CFGDenoiser"]
