"""Per-image reconstruction metrics for images in [−1, 1]: PSNR and SSIM.

Hand-written (a few lines each) rather than from torchmetrics, which difflab does not depend on;
SSIM uses a uniform window (3×3 suits 8×8 digits) instead of the usual 11×11 Gaussian.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def psnr(x: Tensor, truth: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio per sample, 10 log10(range²/MSE) (images in [−1, 1]: range 2). [B]."""
    mse = (x.clamp(-1, 1) - truth).flatten(1).square().mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def ssim(x: Tensor, truth: Tensor, data_range: float = 2.0, window: int = 3) -> Tensor:
    """Structural similarity per sample (Wang et al. 2004) with a uniform window×window window
    (3 for 8×8 digits), constants K1 = 0.01, K2 = 0.03. x, truth: [B, C, H, W]. [B]."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x = x.clamp(-1, 1)

    def local_mean(v: Tensor) -> Tensor:
        return F.avg_pool2d(v, window, stride=1)

    mu_x, mu_t = local_mean(x), local_mean(truth)
    var_x = local_mean(x * x) - mu_x**2
    var_t = local_mean(truth * truth) - mu_t**2
    cov = local_mean(x * truth) - mu_x * mu_t
    index = ((2 * mu_x * mu_t + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_t**2 + c1) * (var_x + var_t + c2))
    return index.flatten(1).mean(1)


__all__ = ["psnr", "ssim"]
