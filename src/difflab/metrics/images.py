"""Per-image reconstruction metrics for images in [−1, 1]: PSNR and SSIM.

Hand-written (a few lines each); tests/metrics/test_image_metrics.py checks both against torchmetrics
(a test dependency only). SSIM averages the index over the valid region (windows inside the image),
as Wang et al.'s reference code does, with a uniform 3×3 window by default (suits 8×8 digits) or the
usual 11×11 Gaussian of std 1.5 (`window=11, sigma=1.5`, for 28×28 MNIST and up).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def psnr(x: Tensor, truth: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio per sample, 10 log10(range²/MSE) (images in [−1, 1]: range 2). [B]."""
    mse = (x.clamp(-1, 1) - truth).flatten(1).square().mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def _window_kernel(window: int, sigma: float | None, channels: int, like: Tensor) -> Tensor:
    """[C, 1, window, window] depthwise weights summing to 1: uniform (sigma None) or Gaussian of std sigma."""
    if sigma is None:
        weights_1d = torch.ones(window, dtype=like.dtype, device=like.device)
    else:
        offsets = torch.arange(window, dtype=like.dtype, device=like.device) - (window - 1) / 2
        weights_1d = torch.exp(-offsets.square() / (2 * sigma**2))
    weights_1d = weights_1d / weights_1d.sum()
    return torch.outer(weights_1d, weights_1d).expand(channels, 1, window, window)


def ssim(x: Tensor, truth: Tensor, data_range: float = 2.0, window: int = 3, sigma: float | None = None) -> Tensor:
    """Structural similarity per sample (Wang et al. 2004), constants K1 = 0.01, K2 = 0.03, averaged over
    the valid region. window: side of the local window (3 for 8×8 digits, 11 for 28×28); sigma: None for a
    uniform window, else the std of a Gaussian one (1.5 with window 11). x, truth: [B, C, H, W]. [B]."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x = x.clamp(-1, 1)
    kernel = _window_kernel(window, sigma, x.shape[1], x)

    def local_mean(v: Tensor) -> Tensor:
        return F.conv2d(v, kernel, groups=v.shape[1])

    mu_x, mu_t = local_mean(x), local_mean(truth)
    var_x = local_mean(x * x) - mu_x**2
    var_t = local_mean(truth * truth) - mu_t**2
    cov = local_mean(x * truth) - mu_x * mu_t
    index = ((2 * mu_x * mu_t + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_t**2 + c1) * (var_x + var_t + c2))
    return index.flatten(1).mean(1)


__all__ = ["psnr", "ssim"]
