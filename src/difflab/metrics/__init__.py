"""Sample-quality metrics: sliced Wasserstein, MMD, Fréchet distance, exact NLL, a digit classifier, PSNR / SSIM."""

from difflab.metrics.digit_classifier import (
    DigitClassifier,
    digits_frechet,
    digits_frechet_floor,
    get_digit_classifier,
)
from difflab.metrics.distances import exact_nll, frechet_distance, mmd, sliced_wasserstein
from difflab.metrics.images import psnr, ssim

__all__ = [
    "DigitClassifier", "digits_frechet", "digits_frechet_floor", "exact_nll", "frechet_distance",
    "get_digit_classifier", "mmd", "psnr", "sliced_wasserstein", "ssim",
]
