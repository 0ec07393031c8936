"""Stage 1 against the exact guided teacher: a Gaussian mixture whose components carry class labels
has exact conditional and unconditional denoisers, hence an exact x̂^w = (1 + w)x̂_c − w·x̂_u for
every w. A tiny w-conditioned MLP student distilled from it must match it across w."""
from __future__ import annotations

import torch

from difflab.distill import truncated_snr_weight


def exact_guided(mixture, x, sigma, w, labels):
    """(1 + w)·D(x | c) − w·D(x), written out here from the mixture's exact denoisers (not CFGDenoiser)."""
    d_c = mixture(x, sigma, class_labels=labels)
    d_u = mixture(x, sigma, class_labels=torch.full_like(labels, -1))
    return (1 + w) * d_c - w * d_u


def test_stage1_student_matches_the_exact_guided_teacher_across_w(distilled):
    """Weighted error max(SNR,1)·‖x̂_η − x̂^w‖² at σ where guidance acts (σ ≥ 2: at small σ the well-separated
    classes make x̂_c = x̂_u), relative to the size of guidance's effect S = E‖x̂^4 − x̂^0‖². A student that
    ignored w could at best be S/4 off at w = 0 or w = 4; the bound S/10 demands that it follows w
    (measured ≤ S/25 at σ = 2, ≤ S/100 above)."""
    mixture, student = distilled[:2]
    gen = torch.Generator().manual_seed(5)
    n = 4000
    labels = torch.randint(0, 2, (n,), generator=gen)
    x0 = mixture.sample(n, generator=gen, class_labels=labels)
    for sigma_value in (2.0, 4.0, 10.0, 30.0):
        sigma = torch.full((n,), sigma_value)
        x = x0 + sigma_value * torch.randn(n, 2, generator=gen)
        weight = truncated_snr_weight(sigma)[:, None]
        scale = (weight * (exact_guided(mixture, x, sigma, 4.0, labels)
                           - exact_guided(mixture, x, sigma, 0.0, labels)).square()).mean()
        for w in (0.0, 1.0, 2.0, 3.0, 4.0):
            with torch.no_grad():
                error = (weight * (student(x, sigma, w=w, class_labels=labels)
                                   - exact_guided(mixture, x, sigma, w, labels)).square()).mean()
            assert error < scale / 10, (sigma_value, w, float(error), float(scale))
