"""Property-based checks (hypothesis): every solver, at every budget it accepts, on any batch and
data shape, dtype and σ range, returns a finite state of the input's shape and dtype; a budget it
cannot spend is refused with ConfigError before any model call."""
from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from difflab import GaussianMixture, sample, sigmas_for_nfe
from difflab.core.errors import ConfigError, SigmaRangeError
from difflab.sampling import SOLVERS, PerSampleGenerator
from tests.sampling.helpers import CountingDenoiser

SHAPES = [(2,), (1, 2, 2), (3,)]


def mixture(shape: tuple[int, ...]) -> GaussianMixture:
    dim = math.prod(shape)
    means = torch.stack([torch.linspace(-1, 1, dim), torch.linspace(1, -1, dim)])
    return GaussianMixture(means, stds=[0.3, 0.5], data_shape=shape)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(solver=st.sampled_from(sorted(SOLVERS)), nfe=st.integers(1, 12), batch=st.integers(1, 5),
       shape=st.sampled_from(SHAPES), dtype=st.sampled_from([torch.float32, torch.float64]),
       afs=st.booleans(), to_zero=st.booleans(), kind=st.sampled_from(["karras", "logsnr", "time_uniform"]),
       sigma_max=st.floats(1.0, 200.0), ratio=st.floats(1e-4, 0.5))
def test_any_accepted_budget_gives_a_finite_state_of_the_right_shape(solver, nfe, batch, shape, dtype, afs,
                                                                     to_zero, kind, sigma_max, ratio):
    model = CountingDenoiser(mixture(shape))
    try:
        sigmas = sigmas_for_nfe(solver, nfe, kind, sigma_max * ratio, sigma_max, afs=afs, to_zero=to_zero)
    except (ConfigError, SigmaRangeError):   # a budget or range the grid cannot serve: refused up front
        assert model.calls == 0
        event("refused")
        return
    x = sigma_max * torch.randn(batch, *shape, generator=torch.Generator().manual_seed(nfe), dtype=dtype)
    generator = PerSampleGenerator(range(batch))
    out = sample(model, x, sigmas, solver, generator=generator, afs=afs)
    assert out.shape == x.shape and out.dtype == dtype
    assert bool(torch.isfinite(out).all())
    assert model.calls == nfe                  # the grid spends exactly the budget it was built for
    event("sampled")
