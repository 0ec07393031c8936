"""The denoiser contract, its wrappers and the analytic Gaussian mixture."""
from difflab.core.denoiser import Denoiser, append_dims, eps, last_feature, score, sigma_batch
from difflab.core.fingerprint import fingerprint
from difflab.core.mixture import GaussianMixture
from difflab.core.wrappers import CFGDenoiser, EDMDenoiser, FlowDenoiser, VPDenoiser

__all__ = ["Denoiser", "append_dims", "eps", "score", "sigma_batch", "last_feature", "fingerprint", "GaussianMixture",
           "EDMDenoiser", "VPDenoiser", "FlowDenoiser", "CFGDenoiser"]
