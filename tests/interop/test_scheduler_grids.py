"""DifflabScheduler on a learned grid: `from_grid(LearnedGrid)` / `grid_sigmas` in the config. The exact target is
`difflab.sample` on `VPDenoiser(the same model)` with the grid's own σ's (`grid.check`), from the same noise, as in
tests/interop/test_scheduler.py; the σ's survive save_config / from_pretrained."""
from __future__ import annotations

import math

import pytest
import torch

from difflab import sample
from difflab.amed.grids import LearnedGrid
from difflab.core.errors import ConfigError
from difflab.core.wrappers import VPDenoiser

diffusers = pytest.importorskip("diffusers")
from difflab.interop.diffusers.scheduler import DifflabScheduler  # noqa: E402
from tests.interop.test_scheduler import MixtureEpsModel, _pipeline_loop, _relative  # noqa: E402

# hand-placed levels inside the linear DDPM table's σ range (≈ 0.01 … 157), deliberately far from any Karras grid
LEVELS = [120.0, 9.0, 2.5, 0.6, 0.15, 0.05, 0.02]


@pytest.mark.parametrize("solver, nfe, afs, refine, points",
                         [("ipndm", 6, False, False, 7), ("dpmpp_2m", 5, True, False, 7),
                          ("heun", 6, False, False, 4), ("ipndm", 6, False, True, 4)],
                         ids=["ipndm", "dpmpp_2m-afs", "heun", "ipndm-refined"])
def test_scheduler_on_a_learned_grid_equals_sample_on_that_grid(mix2d, solver, nfe, afs, refine, points):
    levels = LEVELS[:: 2] if points == 4 else LEVELS
    grid = LearnedGrid(torch.tensor(levels, dtype=torch.float64), solver, nfe, "ld3", afs=afs, refine=refine)
    scheduler = DifflabScheduler.from_grid(grid)
    assert scheduler.config.grid_sigmas == grid.check(None).tolist() and scheduler.config.solver == solver
    model = MixtureEpsModel(mix2d.model, scheduler.alphas_cumprod)
    x_vp = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out_vp = _pipeline_loop(scheduler, model, x_vp, nfe)
    assert len(model.ts) == nfe

    sigmas = grid.check(None)
    vp = VPDenoiser(MixtureEpsModel(mix2d.model, scheduler.alphas_cumprod), scheduler.alphas_cumprod)
    expected = sample(vp, x_vp * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, solver=solver, afs=afs)
    got = out_vp * math.sqrt(1 + float(sigmas[-1]) ** 2)
    assert _relative(got, expected) < 1e-6         # the same arithmetic in another order: round-off (as test_scheduler)


def test_grid_sigmas_survive_save_and_reload_and_an_nfe_the_grid_cannot_spend_is_refused(mix2d, tmp_path):
    grid = LearnedGrid(torch.tensor(LEVELS, dtype=torch.float64), "ipndm", 6, "gits")
    DifflabScheduler.from_grid(grid).save_config(tmp_path)
    reloaded = DifflabScheduler.from_pretrained(tmp_path)
    assert reloaded.config.grid_sigmas == LEVELS
    x_vp = torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    first = _pipeline_loop(DifflabScheduler.from_grid(grid), MixtureEpsModel(mix2d.model, reloaded.alphas_cumprod),
                           x_vp, 6)
    again = _pipeline_loop(reloaded, MixtureEpsModel(mix2d.model, reloaded.alphas_cumprod), x_vp, 6)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="ipndm"):
        reloaded.set_timesteps(5)
    with pytest.raises(Exception, match="table range"):
        DifflabScheduler(grid_sigmas=[500.0, 1.0, 0.1]).set_timesteps(2)
