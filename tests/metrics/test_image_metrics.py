"""PSNR and SSIM (difflab.metrics.images) against torchmetrics, a test-only reference."""

import pytest
import torch

from difflab.metrics import psnr, ssim

functional = pytest.importorskip("torchmetrics.functional.image")


def noisy_pair(side: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction, truth), both [6, 1, side, side] in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    truth = torch.rand(6, 1, side, side, generator=generator) * 2 - 1
    return (truth + 0.3 * torch.randn(truth.shape, generator=generator)).clamp(-1, 1), truth


def torchmetrics_ssim_valid(x, truth, **window) -> torch.Tensor:
    """torchmetrics' SSIM map (it reflect-pads), averaged over the valid region that difflab averages over."""
    _, index_map = functional.structural_similarity_index_measure(
        x, truth, data_range=2.0, reduction="none", return_full_image=True, **window)
    pad = (window.get("kernel_size", 11) - 1) // 2
    return index_map[..., pad:-pad, pad:-pad].flatten(1).mean(1)


@pytest.mark.parametrize("side", [8, 28])
def test_psnr_matches_torchmetrics_per_image(side):
    x, truth = noisy_pair(side)
    expected = functional.peak_signal_noise_ratio(x, truth, data_range=2.0, reduction="none", dim=(1, 2, 3))
    torch.testing.assert_close(psnr(x, truth), expected)  # float32 defaults: the same formula, ~1e-5 relative


def test_ssim_uniform_3x3_matches_torchmetrics_on_8x8_digits():
    x, truth = noisy_pair(8)
    expected = torchmetrics_ssim_valid(x, truth, gaussian_kernel=False, kernel_size=3)
    torch.testing.assert_close(ssim(x, truth), expected)


def test_ssim_gaussian_11x11_matches_torchmetrics_on_28x28():
    x, truth = noisy_pair(28, seed=1)
    expected = torchmetrics_ssim_valid(x, truth)  # torchmetrics' default window: Gaussian, std 1.5, 11×11
    torch.testing.assert_close(ssim(x, truth, window=11, sigma=1.5), expected)
    assert ssim(truth, truth, window=11, sigma=1.5) == pytest.approx(torch.ones(6), abs=1e-5)
