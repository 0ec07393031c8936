"""Precision at the boundary (the solver state is float32 or float64, the network runs in its own
dtype) and grid arguments refused before anything is allocated."""
from __future__ import annotations

import pytest
import torch

import difflab
from difflab.core.errors import ConfigError
from difflab.core.wrappers import EDMDenoiser
from difflab.nets import MLP


@pytest.fixture
def network_denoiser() -> EDMDenoiser:
    torch.manual_seed(0)
    net = MLP(dim=2, hidden=32, depth=2, embed_dim=16, zero_init_output=False)
    return EDMDenoiser(net, sigma_data=1.0, data_shape=(2,)).eval().requires_grad_(False)


@pytest.mark.parametrize("dtype, resolution", [(torch.float16, 2**-10), (torch.bfloat16, 2**-7)])
@pytest.mark.reliability("numerics")
def test_half_precision_noise_is_integrated_in_float32_and_returned_in_its_dtype(network_denoiser, dtype, resolution):
    sigmas = difflab.get_sigmas("karras", 8)
    x = (80 * torch.randn(16, 2, generator=torch.Generator().manual_seed(1))).to(dtype)
    out = difflab.sample(network_denoiser, x, sigmas, solver="heun")
    reference = difflab.sample(network_denoiser, x.float(), sigmas, solver="heun")
    assert out.dtype == dtype
    # the only difference left is the final rounding of the float32 result to `dtype`
    torch.testing.assert_close(out.float(), reference, rtol=resolution, atol=resolution)


@pytest.mark.reliability("numerics")
def test_float64_noise_on_a_float32_network_stays_float64(network_denoiser):
    sigmas = difflab.get_sigmas("karras", 8)
    x = 80 * torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = difflab.sample(network_denoiser, x, sigmas, solver="dpmpp_2m")
    reference = difflab.sample(network_denoiser, x.float(), sigmas, solver="dpmpp_2m")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), reference, rtol=1e-4, atol=1e-4)   # float32 network round-off


@pytest.mark.reliability("numerics")
def test_a_bf16_network_runs_on_a_float32_state(network_denoiser):
    bf16 = EDMDenoiser(MLP(**network_denoiser.net.config), sigma_data=1.0, data_shape=(2,))
    bf16.load_state_dict(network_denoiser.state_dict())
    bf16 = bf16.to(torch.bfloat16).eval()
    x = torch.randn(8, 2)
    sigma = torch.full((8,), 2.0)
    out = bf16(x, sigma)
    assert out.dtype == torch.float32
    # bf16 weights: about 3 significant digits
    torch.testing.assert_close(out, network_denoiser(x, sigma), rtol=0.05, atol=0.05)
    assert not torch.equal(out, network_denoiser(x, sigma))   # it did run in bf16


@pytest.mark.parametrize("kwargs", [{"n": 10**9}, {"n": 5, "rho": 0.0}, {"n": 5, "rho": float("nan")},
                                    {"n": 5, "rho": -7.0}, {"n": 5, "rho": float("inf")}])
@pytest.mark.reliability("numerics")
def test_grid_arguments_are_refused_before_allocation(kwargs):
    with pytest.raises(ConfigError):
        difflab.get_sigmas("karras", **kwargs)
