"""Each wrapper, fed a "network" built from the mixture's exact outputs in that network's own
convention (written here from the papers, not from difflab), must give back the mixture's D."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import difflab
from difflab import CFGDenoiser, EDMDenoiser, FlowDenoiser, VPDenoiser
from difflab.core.errors import ConfigError, ShapeError, SigmaRangeError
from tests.conftest import np_denoiser

# DDPM's linear β schedule (Ho et al. 2020), T = 1000, in float64
BETAS = np.linspace(1e-4, 0.02, 1000)
ALPHAS_CUMPROD = np.cumprod(1 - BETAS)
TABLE_SIGMAS = np.sqrt((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD)   # σ_t, increasing in t
TABLE_INDICES = [0, 1, 37, 250, 600, 999]                         # σ from 0.010 to 157


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def _x_for(case, n: int, rng) -> torch.Tensor:
    return _t(case.means.mean(0) + 3 * rng.standard_normal((n, case.dim)))


class CountingDenoiser(nn.Module):
    """Passes through to `base`, recording the batch size of every call."""

    def __init__(self, base):
        super().__init__()
        self.base, self.batch_sizes = base, []
        self.data_shape = getattr(base, "data_shape", None)

    def forward(self, x, sigma, **cond):
        self.batch_sizes.append(x.shape[0])
        return self.base(x, sigma, **cond)


# ----- VP (discrete ᾱ table): ε, v and x0 prediction -------------------------------------------
def vp_model_from_mixture(mixture, prediction_type: str):
    """model(x_vp, t) in DDPM conventions: x_vp = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε, v = α_t·ε − s_t·x0
    (Salimans & Ho 2022). Only integer t is accepted, so the test does not depend on interpolation."""

    def model(x_vp, t):
        index = t.round().long()
        assert float((t - index).abs().max()) < 1e-6, f"expected table timesteps, got {t.tolist()}"
        alpha_t = _t(np.sqrt(ALPHAS_CUMPROD[index.numpy()]))[:, None]
        s_t = _t(np.sqrt(1 - ALPHAS_CUMPROD[index.numpy()]))[:, None]
        x = x_vp / alpha_t                                          # back to σ-space: x = x0 + σ ε
        x0_hat = mixture(x, _t(TABLE_SIGMAS[index.numpy()]))
        eps_hat = (x_vp - alpha_t * x0_hat) / s_t
        return {"epsilon": eps_hat, "v_prediction": alpha_t * eps_hat - s_t * x0_hat, "sample": x0_hat}[prediction_type]

    return model


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_wrapper_recovers_mixture_denoiser_at_table_sigmas(mix2d, prediction_type, rng):
    model = vp_model_from_mixture(mix2d.model, prediction_type)
    vp = VPDenoiser(model, _t(ALPHAS_CUMPROD), prediction_type)
    sigma = _t(TABLE_SIGMAS[TABLE_INDICES])                       # one table σ per row
    x = _x_for(mix2d, len(TABLE_INDICES), rng) + sigma[:, None] * _t(rng.standard_normal((len(sigma), 2)))
    expected = np_denoiser(mix2d, x.numpy(), sigma.numpy())
    # float64 round-off, amplified by at most σ_max ≈ 157 in x − σ·ε̂: 1e-9 absolute
    np.testing.assert_allclose(vp(x, sigma).numpy(), expected, rtol=0, atol=1e-9)


def test_vp_sigma_to_t_inverts_the_table_and_is_linear_in_log_sigma_between_entries():
    vp = VPDenoiser(lambda x, t: x, _t(ALPHAS_CUMPROD))
    # exactly the table's timesteps at the table's σ (float64 round-off of log σ only)
    np.testing.assert_allclose(vp.sigma_to_t(_t(TABLE_SIGMAS)).numpy(), np.arange(1000), rtol=0, atol=1e-8)
    # linear in log σ: the geometric mean of σ_j and σ_{j+1} sits at j + 1/2, 1/4 of the way at j + 1/4
    j = np.arange(999)
    log_lo, log_hi = np.log(TABLE_SIGMAS[:-1]), np.log(TABLE_SIGMAS[1:])
    for frac in (0.25, 0.5):
        t = vp.sigma_to_t(_t(np.exp(log_lo + frac * (log_hi - log_lo)))).numpy()
        np.testing.assert_allclose(t, j + frac, rtol=0, atol=1e-7)  # round-off of tiny log-σ gaps near t=0
    sweep = vp.sigma_to_t(_t(np.geomspace(TABLE_SIGMAS[0], TABLE_SIGMAS[-1], 20_000))).numpy()
    assert (np.diff(sweep) > 0).all()
    assert vp.sigma_min == pytest.approx(TABLE_SIGMAS[0], rel=1e-12)
    assert vp.sigma_max == pytest.approx(TABLE_SIGMAS[-1], rel=1e-12)


@pytest.mark.parametrize("factor_min, factor_max", [(0.9, 1.0), (1.0, 1.1)])
def test_vp_wrapper_raises_sigma_range_error_outside_its_table(mix2d, factor_min, factor_max):
    vp = VPDenoiser(vp_model_from_mixture(mix2d.model, "epsilon"), _t(ALPHAS_CUMPROD))
    sigma = _t([TABLE_SIGMAS[0] * factor_min, TABLE_SIGMAS[-1] * factor_max])
    with pytest.raises(SigmaRangeError, match="outside"):
        vp(torch.zeros(2, 2, dtype=torch.float64), sigma)


def test_vp_wrapper_rejects_unknown_prediction_type():
    with pytest.raises(ConfigError, match="prediction_type"):
        VPDenoiser(lambda x, t: x, _t(ALPHAS_CUMPROD), "score")


# ----- rectified flow ---------------------------------------------------------------------------
def flow_model_from_mixture(mixture, time_scale: float):
    """v(x_t, t) = ε − x0 for x_t = (1 − t)·x0 + t·ε, from the mixture's exact E[x0 | x_t]."""

    def model(x_t, t_scaled):
        t = (t_scaled / time_scale)[:, None]
        sigma = t / (1 - t)                                        # x_t / (1 − t) = x0 + σ ε
        x0_hat = mixture(x_t / (1 - t), sigma[:, 0])
        eps_hat = (x_t - (1 - t) * x0_hat) / t
        return eps_hat - x0_hat

    return model


@pytest.mark.parametrize("time_scale", [1.0, 1000.0])
def test_flow_wrapper_recovers_mixture_denoiser(mix2d, time_scale, rng):
    flow = FlowDenoiser(flow_model_from_mixture(mix2d.model, time_scale), time_scale=time_scale)
    sigma = _t([0.02, 0.3, 1.0, 4.0, 60.0])
    x = _x_for(mix2d, len(sigma), rng) + sigma[:, None] * _t(rng.standard_normal((len(sigma), 2)))
    # float64 round-off amplified by 1/t and by (1+σ) in the conversions: 1e-9
    np.testing.assert_allclose(flow(x, sigma).numpy(), np_denoiser(mix2d, x.numpy(), sigma.numpy()),
                               rtol=0, atol=1e-9)


# ----- EDM preconditioning ----------------------------------------------------------------------
def edm_net_inverting_preconditioning(mixture, sigma_data: float):
    """F(c_in·x, c_noise) = (D_exact − c_skip·x)/c_out, with Karras et al. 2022, Table 1:
    c_skip = σd²/(σ²+σd²), c_out = σ·σd/sqrt(σ²+σd²), c_in = 1/sqrt(σ²+σd²), c_noise = ln(σ)/4."""

    def net(x_in, c_noise):
        sigma = torch.exp(4 * c_noise)
        s = sigma[:, None]
        x = x_in * torch.sqrt(s**2 + sigma_data**2)
        c_skip = sigma_data**2 / (s**2 + sigma_data**2)
        c_out = s * sigma_data / torch.sqrt(s**2 + sigma_data**2)
        return (mixture(x, sigma) - c_skip * x) / c_out

    return net


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_wrapper_with_inverse_preconditioned_net_recovers_mixture_denoiser(mix2d, sigma_data, rng):
    edm = EDMDenoiser(edm_net_inverting_preconditioning(mix2d.model, sigma_data), sigma_data=sigma_data)
    sigma = _t([0.002, 0.05, 0.5, 3.0, 80.0])
    x = _x_for(mix2d, len(sigma), rng) + sigma[:, None] * _t(rng.standard_normal((len(sigma), 2)))
    # float64 round-off; c_noise = ln σ/4 round-trips σ to ~1e-15 relative
    np.testing.assert_allclose(edm(x, sigma).numpy(), np_denoiser(mix2d, x.numpy(), sigma.numpy()),
                               rtol=0, atol=1e-9)


# ----- classifier-free guidance -----------------------------------------------------------------
@pytest.fixture
def cfg_inputs(mix2d, rng):
    x = _x_for(mix2d, 6, rng)
    sigma = _t([0.3, 0.8, 1.5, 0.3, 0.8, 1.5])
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    d_c = mix2d.model(x, sigma, class_labels=labels)                       # separate calls
    d_u = mix2d.model(x, sigma, class_labels=torch.full_like(labels, -1))
    assert float((d_c - d_u).abs().max()) > 0.1, "conditioning must matter for the test to have power"
    return x, sigma, labels, d_c, d_u


def test_cfg_with_w0_is_exactly_the_conditional_model(mix2d, cfg_inputs):
    x, sigma, labels, d_c, _ = cfg_inputs
    counting = CountingDenoiser(mix2d.model)
    got = CFGDenoiser(counting, w=0.0)(x, sigma, class_labels=labels)
    torch.testing.assert_close(got, d_c, rtol=0, atol=1e-12)  # d_u + (d_c − d_u): float64 round-off only
    assert counting.batch_sizes == [2 * len(x)]                  # one batched call for both halves


def test_cfg_with_w1_is_twice_conditional_minus_unconditional(mix2d, cfg_inputs):
    x, sigma, labels, d_c, d_u = cfg_inputs
    counting = CountingDenoiser(mix2d.model)
    guided = CFGDenoiser(counting, w=1.0)
    torch.testing.assert_close(guided(x, sigma, class_labels=labels), 2 * d_c - d_u, rtol=0, atol=1e-12)
    # the per-call keyword `w` overrides the stored one; a [B] w guides each row by its own weight
    w = _t([0.0, 0.5, 1.0, 2.0, 3.0, 7.5])
    torch.testing.assert_close(guided(x, sigma, w=w, class_labels=labels),
                               d_u + (1 + w[:, None]) * (d_c - d_u), rtol=0, atol=1e-11)
    assert counting.batch_sizes == [2 * len(x)] * 2              # exactly one base call per call


def test_cfg_without_class_labels_raises_config_error(mix2d, rng):
    with pytest.raises(ConfigError, match="unconditional"):
        CFGDenoiser(mix2d.model, w=1.0)(_x_for(mix2d, 2, rng), _t([1.0, 1.0]))


# ----- eps / score helpers ----------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.1, 1.0, 10.0])
def test_eps_and_score_helpers_agree_with_exact_mixture_score(mixfull, sigma, rng):
    x = _x_for(mixfull, 8, rng)
    exact_score = mixfull.model.score(x, sigma)
    for sigma_arg in (sigma, _t(np.full(8, sigma))):             # scalar and per-sample [B] σ
        # (D − x)/σ² cancels digits of x: round-off ~1e-16·|x|/σ², under 1e-10 for σ >= 0.1
        torch.testing.assert_close(difflab.score(mixfull.model, x, sigma_arg), exact_score, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(difflab.eps(mixfull.model, x, sigma_arg), -sigma * exact_score,
                                   rtol=1e-9, atol=1e-10)  # ε̂ = −σ·∇log p_σ
    with pytest.raises(ShapeError, match="sigma"):
        difflab.eps(mixfull.model, x, _t(np.ones(3)))
