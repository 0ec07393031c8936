"""Sample-quality metrics: sliced Wasserstein, MMD, Fréchet distance, exact NLL, digit classifiers, PSNR / SSIM."""

from difflab.metrics.digit_classifier import (
    DigitClassifier,
    class_accuracy,
    digits_frechet,
    digits_frechet_floor,
    frechet,
    frechet_floor,
    get_classifier,
    get_digit_classifier,
)
from difflab.metrics.distances import exact_nll, frechet_distance, mean_l2, mmd, sliced_wasserstein
from difflab.metrics.images import psnr, ssim

__all__ = [
    "DigitClassifier", "class_accuracy", "digits_frechet", "digits_frechet_floor", "exact_nll", "frechet",
    "frechet_distance", "frechet_floor", "get_classifier", "get_digit_classifier", "mean_l2", "mmd", "psnr",
    "sliced_wasserstein", "ssim",
]
