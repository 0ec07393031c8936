"""DPS and ΠGDM: their guidance terms equal the closed forms on a 1-D Gaussian, ΠGDM is the exact
posterior denoiser for a Gaussian prior, and both run under any solver (and under no_grad)."""
from __future__ import annotations

import math

import pytest
import torch

from difflab import GaussianMixture, get_sigmas, sample
from difflab.condition import DPS, Inpaint, Operator, PiGDM
from difflab.core.errors import ConfigError

MU, S, A_SCALE, SIGMA_Y, Y = 0.7, 1.3, 1.8, 0.4, -0.9


class Scale(Operator):
    """y = a·x: the 1-D linear-Gaussian measurement."""

    def __init__(self, a: float, sigma_y: float):
        super().__init__(sigma_y)
        self.a = a

    def forward(self, x):
        return self.a * x

    def adjoint(self, v, at=None):
        return self.a * v


def gaussian_1d() -> GaussianMixture:
    return GaussianMixture([[MU]], stds=[S])


SIGMAS = torch.tensor([0.05, 0.3, 1.0, 2.5, 10.0], dtype=torch.float64)
X = torch.tensor([[-2.0], [0.1], [0.9], [3.0], [-12.0]], dtype=torch.float64)


def closed_form_pieces():
    """J = ∂D/∂x = s²/(s² + σ²) and x̂0 = μ + J(x − μ) for the prior N(μ, s²), recomputed here."""
    jac = S**2 / (S**2 + SIGMAS**2)
    x0_hat = MU + jac * (X[:, 0] - MU)
    return jac, x0_hat


def test_dps_guidance_equals_its_closed_form():
    zeta = 0.37
    prior, op = gaussian_1d(), Scale(A_SCALE, SIGMA_Y)
    y = torch.full((5, 1), Y, dtype=torch.float64)
    term = DPS(prior, op, zeta)(X, SIGMAS, y=y) - prior(X, SIGMAS)
    jac, x0_hat = closed_form_pieces()
    # −ζ ∇_x |y − a D(x)| = ζ J a sign(y − a x̂0)
    expected = zeta * jac * A_SCALE * torch.sign(Y - A_SCALE * x0_hat)
    assert torch.allclose(term[:, 0], expected, rtol=1e-10, atol=1e-12)


def test_pigdm_guidance_equals_its_closed_form():
    weight, sigma_data = 0.8, 0.9
    prior, op = gaussian_1d(), Scale(A_SCALE, SIGMA_Y)
    y = torch.full((5, 1), Y, dtype=torch.float64)
    term = PiGDM(prior, op, weight, sigma_data)(X, SIGMAS, y=y) - prior(X, SIGMAS)
    jac, x0_hat = closed_form_pieces()
    r2 = SIGMAS**2 * sigma_data**2 / (SIGMAS**2 + sigma_data**2)
    # w σ² J a (y − a x̂0)/(a² r² + σ_y²)
    expected = weight * SIGMAS**2 * jac * A_SCALE * (Y - A_SCALE * x0_hat) / (A_SCALE**2 * r2 + SIGMA_Y**2)
    assert torch.allclose(term[:, 0], expected, rtol=1e-8, atol=1e-12)


def test_pigdm_is_the_exact_posterior_denoiser_for_a_gaussian_prior():
    """With σ_d = the prior's std and w = 1, ΠGDM's N(A x̂0, r² A Aᵀ + σ_y²) is p(y | x_σ) exactly."""
    dim, std = 4, 0.8
    prior = GaussianMixture([[0.3, -0.5, 1.0, 0.0]], stds=[std])
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    op = Inpaint(mask, sigma_y=0.3, kind="coords")
    y_obs = torch.tensor([0.9, 0.0, -1.2, 0.4], dtype=torch.float64)
    posterior = prior.posterior(torch.eye(dim, dtype=torch.float64)[mask.bool()], y_obs[mask.bool()], 0.3)
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(6, dim, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.2, 0.7, 1.5, 4.0, 30.0], dtype=torch.float64)
    guided = PiGDM(prior, op, 1.0, sigma_data=std)(x, sigma, y=y_obs.expand(6, dim))
    assert torch.allclose(guided, posterior(x, sigma), rtol=1e-9, atol=1e-10)
    # a wrong variance (σ_d off by 20%) is visibly not exact
    off = PiGDM(prior, op, 1.0, sigma_data=1.2 * std)(x, sigma, y=y_obs.expand(6, dim))
    assert (off - posterior(x, sigma)).abs().max() > 1e-2


@pytest.mark.parametrize("method", [DPS, PiGDM])
def test_guided_denoisers_run_any_solver_under_no_grad(method):
    prior = GaussianMixture([[0.0, 0.0]], stds=[1.0])
    op = Inpaint(torch.tensor([1.0, 0.0]), sigma_y=0.2, kind="coords")
    y = torch.tensor([[1.5, 0.0]]).expand(8, 2)
    x = 20 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = get_sigmas("karras", 12, 0.01, 20.0)
    with torch.no_grad():
        for solver in ("euler", "heun", "dpmpp_2m"):
            out = sample(method(prior, op), x, sigmas, solver, y=y.double())
            assert out.shape == x.shape and not out.requires_grad and bool(torch.isfinite(out).all())
        unguided = sample(prior, x, sigmas, "heun")
    # guidance pulls the observed coordinate towards y = 1.5 (the prior mean is 0)
    assert float((out[:, 0] - 1.5).abs().mean()) < 0.7 * float((unguided[:, 0] - 1.5).abs().mean())


def test_guided_denoisers_need_a_measurement_and_sane_options():
    prior = GaussianMixture([[0.0]], stds=[1.0])
    op = Scale(1.0, 0.1)
    with pytest.raises(ConfigError):
        DPS(prior, op)(torch.zeros(2, 1), torch.ones(2))
    with pytest.raises(ConfigError):
        DPS(prior, op, zeta=0.0)
    with pytest.raises(ConfigError):
        PiGDM(prior, op, weight=-1.0)
    assert math.isclose(PiGDM(prior, op).sigma_data, 0.5)
