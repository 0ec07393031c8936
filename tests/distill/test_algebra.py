"""The closed forms of guided distillation, checked exactly (float64) against independent VP-form
recomputations: DDIM in σ-space, the two-step target (incl. σ'' = 0), the forward kernel's variance,
the cosine schedule and the truncated-SNR weight."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab import CFGDenoiser, GaussianMixture
from difflab.distill import (
    cosine_sigma,
    ddim_step,
    kernel_std,
    progressive_target,
    renoise,
    sample_stochastic,
    student_sigmas,
    truncated_snr_weight,
    two_step_target,
)
from difflab.distill.progressive import teacher_two_steps
from difflab.sampling import euler


def vp(sigma):
    """(α, σ_vp, λ) of a σ-space level, computed independently: α² + σ_vp² = 1, σ = σ_vp/α."""
    alpha = 1 / np.sqrt(1 + sigma**2)
    with np.errstate(divide="ignore"):                      # σ = 0: λ = +inf
        return alpha, sigma * alpha, np.log(alpha**2 / (sigma * alpha) ** 2)


def test_ddim_step_in_sigma_space_is_the_vp_ddim_step_and_the_euler_step(mix2d):
    """z_s = α_s x̂ + σ_s (z_t − α_t x̂)/σ_t (Song et al. eq. 12, η = 0) with z = αx, and difflab's Euler."""
    gen = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(64, 2, generator=gen, dtype=torch.float64)
    sigma, sigma_next = 3.0, 0.7
    x0_hat = mix2d.model(x, torch.full((64,), sigma, dtype=torch.float64))
    (a_t, s_t, _), (a_s, s_s, _) = vp(sigma), vp(sigma_next)
    z_s = a_s * x0_hat + s_s * (a_t * x - a_t * x0_hat) / s_t
    torch.testing.assert_close(ddim_step(x, x0_hat, sigma, sigma_next), z_s / a_s, rtol=1e-13, atol=1e-13)
    via_euler = euler(mix2d.model, x, torch.tensor([sigma, sigma_next], dtype=torch.float64))
    torch.testing.assert_close(ddim_step(x, x0_hat, sigma, sigma_next), via_euler, rtol=1e-13, atol=1e-13)


def _guided_mixture(mix2d):
    return CFGDenoiser(mix2d.model)


@pytest.mark.parametrize("n", [1, 2, 4, 128])
def test_one_student_step_with_the_target_lands_exactly_on_two_teacher_steps(mix2d, n):
    """The defining property of x̃ (Salimans & Ho, Alg. 2): DDIM(x_t, x̃, σ_t → σ_t'') = x_t''. Checked for
    every i of an N-step student, the last (σ'' = 0) included, with the exact guided mixture as teacher."""
    teacher = _guided_mixture(mix2d)
    gen = torch.Generator().manual_seed(n)
    batch = 4 * n
    i = torch.arange(1, n + 1, dtype=torch.float64).repeat(4)
    sigma, sigma_1, sigma_2 = (cosine_sigma(u, 80.0) for u in (i / n, (i - 0.5) / n, (i - 1) / n))
    x0 = mix2d.model.sample(batch, generator=gen, dtype=torch.float64)
    x_t = x0 + sigma[:, None] * torch.randn(batch, 2, generator=gen, dtype=torch.float64)
    cond = {"w": torch.linspace(0, 4, batch, dtype=torch.float64), "class_labels": torch.arange(batch) % 2}
    x_t2 = teacher_two_steps(teacher, x_t, sigma, sigma_1, sigma_2, **cond)
    x_tilde = two_step_target(x_t, x_t2, sigma, sigma_2)
    # float64 throughout; the largest |x| is ~ 80·4, so 1e-10 absolute is ~1e-13 relative
    torch.testing.assert_close(ddim_step(x_t, x_tilde, sigma, sigma_2), x_t2, rtol=0, atol=1e-10)
    # and the target is the VP formula of the paper, x̃ = (z'' − (σ''_vp/σ_vp) z)/(α'' − (σ''_vp/σ_vp) α)
    (a, s, _), (a2, s2, _) = vp(sigma.numpy()), vp(sigma_2.numpy())
    z, z2 = a[:, None] * x_t.numpy(), a2[:, None] * x_t2.numpy()
    ratio = (s2 / s)[:, None]
    np.testing.assert_allclose(x_tilde.numpy(), (z2 - ratio * z) / (a2[:, None] - ratio * a[:, None]),
                               rtol=1e-10, atol=1e-10)


def test_final_step_target_is_the_teachers_denoised_midpoint(mix2d):
    """σ'' = 0 (i = 1): x̃ = x̂_teacher(x_t'), bit for bit (docs/methods/distillation.md (8), its edge case)."""
    teacher = _guided_mixture(mix2d)
    n, batch = 4, 32
    gen = torch.Generator().manual_seed(3)
    sigma, sigma_1 = cosine_sigma(1 / n, 80.0), cosine_sigma(0.5 / n, 80.0)
    sigma_b, sigma_1b, zero = (torch.full((batch,), float(v)) for v in (sigma, sigma_1, 0.0))
    x_t = sigma_b[:, None] * torch.randn(batch, 2, generator=gen)
    cond = {"w": torch.full((batch,), 2.0), "class_labels": torch.zeros(batch, dtype=torch.long)}
    target = progressive_target(teacher, x_t, sigma_b, sigma_1b, zero, **cond)
    x_t1 = ddim_step(x_t, teacher(x_t, sigma_b, **cond), sigma_b, sigma_1b)
    assert torch.equal(target, teacher(x_t1, sigma_1b, **cond))
    assert bool(torch.isfinite(target).all())


def test_target_formula_with_a_wrong_denominator_does_not_land():
    """A sanity check that the landing test has teeth: (1 − σ''/σ) replaced by (1 + σ''/σ) misses."""
    gen = torch.Generator().manual_seed(0)
    x_t, x_t2 = (torch.randn(8, 2, generator=gen, dtype=torch.float64) for _ in range(2))
    sigma, sigma_2 = 2.0, 0.5
    wrong = (x_t2 - sigma_2 / sigma * x_t) / (1 + sigma_2 / sigma)
    assert (ddim_step(x_t, wrong, sigma, sigma_2) - x_t2).abs().max() > 1e-2
    right = two_step_target(x_t, x_t2, sigma, sigma_2)
    torch.testing.assert_close(ddim_step(x_t, right, sigma, sigma_2), x_t2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sigma_from, sigma_to", [(0.0, 1.0), (0.3, 0.8), (2.0, 40.0)])
def test_forward_kernel_variance_is_the_vp_kernels(sigma_from, sigma_to):
    """Var(x_to | x_from) = (1 − e^{λ_to − λ_from})·σ_vp,to² / α_to² (docs/methods/distillation.md (10), VP form)."""
    a_to, s_to, lam_to = vp(sigma_to)
    lam_from = np.inf if sigma_from == 0 else vp(sigma_from)[2]
    vp_variance = (1 - np.exp(lam_to - lam_from)) * s_to**2
    np.testing.assert_allclose(float(kernel_std(sigma_from, sigma_to)) ** 2, vp_variance / a_to**2, rtol=1e-12)


def test_stochastic_sampler_adds_noise_of_the_forward_kernels_variance():
    """Data = one point μ (a zero-width mixture: x̂ is exact and DDIM keeps marginals exact). If x_i ~ N(μ, σ_i²),
    every state of the stochastic sampler must be ~ N(μ, σ_j²): the re-noising variance σ_{j}² − σ_{j+1}² is
    the only thing that can make it so. 200k samples: the variance estimate's relative std is sqrt(2/n) = 0.3%;
    tolerance 2%. Wrong variances (σ_j² alone, or the VP variance without the 1/α² conversion) miss by > 10%."""
    mu = torch.tensor([[1.5]], dtype=torch.float64)
    point = GaussianMixture(mu, [0.0])
    sigmas = student_sigmas(4, 80.0)
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    x = mu + float(sigmas[0]) * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    seen = {}

    def record(i, x_i, sigma_next):
        seen[sigma_next] = x_i.clone()
        return x_i

    out = sample_stochastic(point, x, sigmas, generator=gen, replace=record)
    torch.testing.assert_close(out, mu.expand(n, 1), rtol=0, atol=1e-12)       # σ = 0: exactly the point
    for sigma_next, x_i in seen.items():
        if sigma_next > 0:
            variance = float((x_i - mu).square().mean())
            assert abs(variance / sigma_next**2 - 1) < 0.02, (sigma_next, variance)


def test_stochastic_step_is_two_ddim_steps_down_then_one_kernel_step_up(mix2d):
    """One step of `sample_stochastic` with known noise equals the formula written out in VP form."""
    from difflab.sampling import PerSampleGenerator
    sigmas = student_sigmas(3, 80.0)[:3]           # σ_0 > σ_1 > σ_2: one stochastic step σ_0 → σ_1
    seeds = list(range(16))
    x = 80.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = sample_stochastic(mix2d.model, x, sigmas[:2].clone(), generator=PerSampleGenerator(seeds))
    # with a 2-point grid the only step is the last one: plain DDIM
    torch.testing.assert_close(out, ddim_step(x, mix2d.model(x, sigmas[0].expand(16)), sigmas[0], sigmas[1]))
    noise = PerSampleGenerator(seeds).randn((2,), dtype=torch.float64)     # the first step's draw
    x0_hat = mix2d.model(x, sigmas[0].expand(16))
    a0, s0, _ = vp(float(sigmas[0]))
    a1, s1, lam1 = vp(float(sigmas[1]))
    a2, s2, lam2 = vp(float(sigmas[2]))
    z2 = a2 * x0_hat + s2 * (a0 * x - a0 * x0_hat) / s0                              # DDIM z_0 → z_2
    z1 = (a1 / a2) * z2 + math.sqrt((1 - math.exp(lam1 - lam2)) * s1**2) * noise        # q(z_1 | z_2)
    seen = {}
    sample_stochastic(mix2d.model, x, torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]),
                      generator=PerSampleGenerator(seeds), replace=lambda i, x_i, s: seen.setdefault(i, x_i))
    torch.testing.assert_close(seen[0], z1 / a1, rtol=1e-10, atol=1e-10)


def test_cosine_schedule_is_the_papers_logsnr_schedule():
    """λ(u) = −2 log tan(a u + b) with λ = −2 log σ; ends at σ_max and exactly 0; grid points nest (2N ⊃ N)."""
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    sigma = cosine_sigma(u, 80.0, 0.002)
    a, b = math.atan(80.0) - math.atan(0.002), math.atan(0.002)
    lam = -2 * torch.log(torch.tan(a * u + b))
    torch.testing.assert_close(-2 * sigma.log(), lam, rtol=1e-12, atol=1e-12)
    grid4, grid8 = student_sigmas(4, 80.0), student_sigmas(8, 80.0)
    assert float(grid4[0]) == pytest.approx(80.0, rel=1e-12) and float(grid4[-1]) == 0.0
    torch.testing.assert_close(grid8[::2], grid4, rtol=1e-14, atol=0)


def test_truncated_snr_weight_is_max_snr_one():
    sigma = torch.tensor([0.01, 0.5, 1.0, 2.0, 80.0], dtype=torch.float64)
    alpha, s, _ = vp(sigma.numpy())
    np.testing.assert_allclose(truncated_snr_weight(sigma).numpy(), np.maximum(alpha**2 / s**2, 1.0), rtol=1e-12)


def test_renoise_adds_the_kernel_std_times_the_noise():
    x, noise = torch.zeros(3, 2, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64)
    torch.testing.assert_close(renoise(x, 0.6, 1.0, noise), torch.full((3, 2), 0.8, dtype=torch.float64))
