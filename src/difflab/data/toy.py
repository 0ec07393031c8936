"""2-D toy data sets: moons, rings and the default 8-component Gaussian mixture.

Each maker is `(n, seed) -> Dataset` with x: [n, 2] float32, deterministic given the seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from difflab.data.digits import Dataset, check_positive_count


def make_moons(n: int = 10_000, seed: int = 0) -> Dataset:
    """Two interleaved half-circles (scikit-learn, noise 0.05), centred and scaled to unit std.

    Returns x: [n, 2] float32, labels: [n] (which moon), num_classes 2.
    """
    from sklearn.datasets import make_moons as sk_make_moons

    n = check_positive_count(n)
    points, moon = sk_make_moons(n_samples=n, noise=0.05, random_state=seed)
    # one fixed affine map (mean and std of the noise-0.05 moons), the same for every seed and n
    points = (points - np.array([0.5, 0.25])) / np.array([0.867, 0.497])
    return Dataset(torch.from_numpy(points).float(), torch.from_numpy(moon).long(), "moons", 2)


def make_rings(n: int = 10_000, seed: int = 0, radii: tuple[float, ...] = (0.5, 1.0, 1.5),
               radial_std: float = 0.05) -> Dataset:
    """Concentric rings, equal mass per ring, angle uniform, radius + N(0, radial_std²).

    Returns x: [n, 2] float32, labels: [n] (ring index), num_classes len(radii).
    """
    n = check_positive_count(n)
    rng = np.random.default_rng(seed)
    ring = rng.integers(0, len(radii), size=n)
    angle = rng.uniform(0.0, 2 * math.pi, size=n)
    radius = np.asarray(radii)[ring] + radial_std * rng.standard_normal(n)
    points = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return Dataset(torch.from_numpy(points).float(), torch.from_numpy(ring).long(), "rings", len(radii))


def default_gmm(num_components: int = 8, radius: float = 2.0, std: float = 0.2):
    """The default 2-D mixture: `num_components` equal-weight isotropic Gaussians on a circle.

    Returns a `difflab.core.mixture.GaussianMixture` with means [K, 2], stds [K], weights [K].
    """
    from difflab.core.mixture import GaussianMixture

    angle = torch.arange(num_components, dtype=torch.float64) * (2 * math.pi / num_components)
    means = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    stds = torch.full((num_components,), std, dtype=torch.float64)
    weights = torch.full((num_components,), 1.0 / num_components, dtype=torch.float64)
    return GaussianMixture(means, stds, weights)


def make_gmm(n: int = 10_000, seed: int = 0) -> Dataset:
    """Exact samples of `default_gmm()`. Returns x: [n, 2] float32, labels None."""
    n = check_positive_count(n)
    x = default_gmm().sample(n, generator=torch.Generator().manual_seed(seed))
    return Dataset(x.detach().float().contiguous(), None, "gmm", 0)
