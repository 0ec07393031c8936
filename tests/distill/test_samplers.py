"""The few-step samplers: NFE, per-sample seeding, image-to-image and inpainting."""
from __future__ import annotations

import pytest
import torch

from difflab import CFGDenoiser, GaussianMixture
from difflab.core.errors import ConfigError, ShapeError
from difflab.distill import img2img, inpaint, sample_deterministic, sample_stochastic, sample_student, student_sigmas
from difflab.distill.samplers import ddim_step


class Counting(torch.nn.Module):
    def __init__(self, denoiser):
        super().__init__()
        self.denoiser, self.calls = denoiser, 0

    def forward(self, x, sigma, **cond):
        self.calls += 1
        return self.denoiser(x, sigma, **cond)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_deterministic_and_stochastic_samplers_spend_one_evaluation_per_step(mix2d, steps):
    sigmas = student_sigmas(steps, 80.0)
    x = 80.0 * torch.randn(8, 2, dtype=torch.float64)
    for sampler in (sample_deterministic, sample_stochastic):
        model = Counting(mix2d.model)
        sampler(model, x, sigmas)
        assert model.calls == steps


def test_deterministic_sampler_is_ddim_on_the_grid(mix2d):
    sigmas = student_sigmas(3, 80.0)
    x = 80.0 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = x
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        expected = ddim_step(expected, mix2d.model(expected, sigma.expand(8)), sigma, sigma_next)
    torch.testing.assert_close(sample_deterministic(mix2d.model, x, sigmas), expected, rtol=0, atol=0)


class WMixture(torch.nn.Module):
    """The exact guided mixture as a 'student' (takes w), with the attributes sample_student reads."""

    def __init__(self, mixture):
        super().__init__()
        self.guided = CFGDenoiser(mixture)
        self.data_shape, self.sigma_max, self.num_classes, self.steps = (2,), 80.0, 2, None

    def forward(self, x, sigma, w=0.0, **cond):
        return self.guided(x, sigma, w=w, **cond)


@pytest.mark.parametrize("stochastic", [False, True])
def test_sample_student_does_not_depend_on_batch_size(mix2d, stochastic):
    model = WMixture(mix2d.model)
    whole = sample_student(model, 6, steps=4, w=2.0, class_label=1, stochastic=stochastic, seed=3)
    split = sample_student(model, 6, steps=4, w=2.0, class_label=1, stochastic=stochastic, seed=3, batch_size=4)
    torch.testing.assert_close(whole, split, rtol=1e-6, atol=1e-6)
    assert whole.shape == (6, 2)


def test_sample_student_refuses_other_step_counts_and_classes(mix2d):
    model = WMixture(mix2d.model)
    model.steps = 4
    with pytest.raises(ConfigError, match="distilled for 4 steps"):
        sample_student(model, 2, steps=8)
    with pytest.raises(ConfigError, match="class 5"):
        sample_student(model, 2, class_label=5)


def test_img2img_noises_to_the_start_level_and_finishes_with_the_remaining_steps():
    """With a one-point 'data set' the denoiser is exact, so the edit lands on the point; the number of
    evaluations is the remaining steps; the first evaluation sees σ = sigmas[start]."""
    mu = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    model = Counting(GaussianMixture(mu, [0.0]))
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(float(args[1][0])))
    sigmas = student_sigmas(4, 80.0)
    image = torch.zeros(5, 2, dtype=torch.float64)
    out = img2img(model, image, sigmas, start=2, generator=torch.Generator().manual_seed(0))
    assert model.calls == 2 and seen[0] == pytest.approx(float(sigmas[2]))
    torch.testing.assert_close(out, mu.expand(5, 2), rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="start"):
        img2img(model, image, sigmas, start=4)


@pytest.mark.parametrize("stochastic", [False, True])
def test_inpainting_keeps_known_pixels_renoised_at_every_level_and_exact_at_the_end(mix2d, stochastic):
    """After each step the known coordinate is known + σ_next·ε with fresh ε (checked through its spread
    across 4,000 samples, tolerance 5%: the estimate's relative std is 2.2%), and exactly known at σ = 0."""
    n = 4000
    sigmas = student_sigmas(4, 80.0)
    known = torch.tensor([[-4.0, 0.3]], dtype=torch.float64).expand(n, 2).clone()
    mask = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    levels = {}
    model = mix2d.model

    def spy(x, sigma, **cond):
        levels.setdefault(float(sigma[0]), x[:, 1].clone())
        return model(x, sigma, **cond)

    out = inpaint(spy, known, mask, sigmas, stochastic=stochastic, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 1], known[:, 1])
    for sigma, values in levels.items():
        assert abs(float((values - 0.3).std()) / sigma - 1) < 0.05, sigma
    with pytest.raises(ShapeError, match="mask"):
        inpaint(spy, known, torch.ones(3, 2), sigmas)
