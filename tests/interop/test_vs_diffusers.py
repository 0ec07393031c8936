"""DPM-Solver++(2M) against diffusers' `DPMSolverMultistepScheduler` (a numerical reference, not
copied code), on the same model, noise and σ grid.

The model is the analytic mixture wrapped as an ε-prediction VP model on the scheduler's ᾱ table,
evaluated only at exact table timesteps: ε̂(x_vp, t) = ε̂_σ(x_vp·sqrt(1 + σ_t²); σ_t) with
σ_t = sqrt((1 − ᾱ_t)/ᾱ_t). diffusers steps x_vp = x_σ/sqrt(1 + σ²); its dpmsolver++ update in
x_vp is the σ-space update multiplied by α = 1/sqrt(1 + σ²), so the two agree up to diffusers'
float32 step arithmetic. The grid: custom integer timesteps `discrete_timesteps(1000, n)` give
diffusers exactly the table σ's that `discrete_sigmas` picks, followed by σ = 0
(final_sigmas_type="zero") or the table's σ_min (final_sigmas_type="sigma_min").

dpmpp_3m follows the same reference (second difference weighted by φ3 = (e^{−h} − 1 + h)/h² − ½) and
agrees with diffusers' solver_order=3. dpmpp_3m_taylor weights it by 2φ3, the Taylor-consistent value
(test_solvers_order), so it agrees with diffusers only while no 3rd-order step is taken.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from difflab import eps, sample
from difflab.sampling.grids import discrete_sigmas, discrete_timesteps

diffusers = pytest.importorskip("diffusers")


def _scheduler(order: int, final_sigmas_type: str):
    return diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon",
        algorithm_type="dpmsolver++", solver_order=order, solver_type="midpoint", lower_order_final=True,
        final_sigmas_type=final_sigmas_type)


def _run_diffusers(scheduler, mixture, x_sigma: torch.Tensor, n: int, to_zero: bool):
    """Integrate with diffusers from x_σ at the top table σ; returns (the σ-space grid, x_σ at its end)."""
    timesteps = discrete_timesteps(1000, n)
    scheduler.set_timesteps(timesteps=(timesteps if to_zero else timesteps[:-1]).tolist())
    table = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt().double()   # float32 table, as diffusers

    def eps_model(x_vp, t):                                       # ε-prediction VP model from the mixture
        sigma = table[int(t)]
        return eps(mixture, x_vp * torch.sqrt(1 + sigma**2), sigma)

    grid = scheduler.sigmas.double()
    x_vp = x_sigma / torch.sqrt(1 + grid[0] ** 2)
    for t in scheduler.timesteps:
        x_vp = scheduler.step(eps_model(x_vp, t), t, x_vp).prev_sample
    return grid, x_vp * torch.sqrt(1 + grid[-1] ** 2)


@pytest.mark.parametrize("n", [6, 11, 21])                        # 5, 10, 20 steps: lower_order_final on / off
@pytest.mark.parametrize("to_zero", [True, False], ids=["final-zero", "final-sigma-min"])
@pytest.mark.parametrize("order, solver", [(2, "dpmpp_2m"), (3, "dpmpp_3m")])
def test_dpmpp_multistep_agrees_with_diffusers_dpmsolver_multistep(mix2d, order, solver, n, to_zero):
    x_sigma = 157.0 * torch.randn(64, 2, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    grid, x_diffusers = _run_diffusers(_scheduler(order, "zero" if to_zero else "sigma_min"), mix2d.model, x_sigma,
                                       n, to_zero)
    # diffusers keeps σ in float32: the same table levels to float32 round-off
    table = discrete_sigmas(_scheduler(order, "zero").alphas_cumprod, n)
    np.testing.assert_allclose(grid[:n].numpy(), table.numpy(), rtol=1e-6)
    x_difflab = sample(mix2d.model, x_sigma, grid, solver=solver)
    # diffusers computes each step in float32 (measured max 1.5e-6 relative); 1e-4 of the sample scale
    # leaves margin, while a wrong ½ in 2M, the 2φ3 weight in 3M or a skipped lower-order final step
    # moves x by > 1e-3 of it
    scale = x_difflab.abs().max()
    assert ((x_difflab - x_diffusers).abs().max() / scale).item() < 1e-4


@pytest.mark.parametrize("to_zero", [True, False], ids=["final-zero", "final-sigma-min"])
def test_dpmpp_3m_taylor_agrees_with_diffusers_before_its_first_third_order_step_only(mix2d, to_zero):
    scheduler = lambda: _scheduler(3, "zero" if to_zero else "sigma_min")
    x_sigma = 157.0 * torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grid, x_diffusers = _run_diffusers(scheduler(), mix2d.model, x_sigma, 4, to_zero)   # orders 1, 2, 1: no D2
    x_taylor = sample(mix2d.model, x_sigma, grid, solver="dpmpp_3m_taylor")
    assert ((x_taylor - x_diffusers).abs().max() / x_taylor.abs().max()).item() < 1e-4   # as above
    grid, x_diffusers = _run_diffusers(scheduler(), mix2d.model, x_sigma, 11, to_zero)  # 3rd-order steps
    x_taylor = sample(mix2d.model, x_sigma, grid, solver="dpmpp_3m_taylor")
    assert ((x_taylor - x_diffusers).abs().max() / x_taylor.abs().max()).item() > 1e-3   # measured 0.055–0.067


# ----- DifflabScheduler against diffusers' schedulers, inside a pipeline-shaped loop ----------------------
SD_TABLE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _tiny_unet_at_fixed_t():
    """A deterministic ε-model from a tiny random UNet2DModel, evaluated at a fixed timestep: diffusers rounds its
    Karras timesteps to integers and difflab keeps them fractional, so a model that ignores t compares the two
    schedulers' solver maths on identical σ grids."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2).eval()

    def model(x_vp, t):
        with torch.no_grad():
            return unet(x_vp, 500).sample
    return model


def _loop(scheduler, model, nfe: int, blend: bool) -> torch.Tensor:
    """A pipeline loop; with blend, inpainting's step: after each step the left half is the known image noised to
    the next timestep by the scheduler's own add_noise (StableDiffusionInpaintPipeline with a 4-channel UNet)."""
    scheduler.set_timesteps(nfe)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 8, 8, generator=gen) * scheduler.init_noise_sigma
    known, noise = torch.randn(2, 2, 8, 8, generator=gen), torch.randn(2, 2, 8, 8, generator=gen)
    keep = torch.zeros(1, 1, 8, 8)
    keep[..., :4] = 1
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
        if blend and i + 1 < len(scheduler.timesteps):
            x = keep * scheduler.add_noise(known, noise, scheduler.timesteps[i + 1:i + 2]) + (1 - keep) * x
    return x


@pytest.mark.parametrize("blend", [False, True], ids=["plain", "inpainting-blend"])
@pytest.mark.parametrize("nfe", [8, 20])
@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_difflab_scheduler_agrees_with_diffusers_on_the_same_karras_grid_ending_at_zero(solver, nfe, blend):
    from difflab.interop.diffusers.scheduler import DifflabScheduler
    reference = {"dpmpp_2m": diffusers.DPMSolverMultistepScheduler, "unipc": diffusers.UniPCMultistepScheduler}[solver]
    theirs = reference(**SD_TABLE, use_karras_sigmas=True, final_sigmas_type="zero",
                       **({"solver_order": 3} if solver == "unipc" else {}))
    ours = DifflabScheduler.from_config(theirs.config, solver=solver)   # final_sigmas_type="zero" carried over
    assert ours.config.final_sigmas_type == "zero"
    ours.set_timesteps(nfe)
    theirs.set_timesteps(nfe)
    # diffusers' float32 ᾱ table puts its σ_min (1 − ᾱ_0 = 8.5e-4 in float32) off by ~3e-5 relative
    np.testing.assert_allclose(ours.sigmas.numpy(), theirs.sigmas.double().numpy(), rtol=1e-4)
    assert (ours.timesteps - theirs.timesteps.double()).abs().max() <= 0.5   # diffusers rounds to integers
    model = _tiny_unet_at_fixed_t()
    x_ours, x_theirs = _loop(ours, model, nfe, blend), _loop(theirs, model, nfe, blend)
    # both step in float32 (measured ≤ 1.1e-6 of the sample scale); the grid ending at σ_min instead of 0 moves x
    # by ≥ 9e-4 of it, and a step that ignores the blended sample by far more
    assert float((x_ours - x_theirs).abs().max() / x_theirs.abs().max()) < 1e-4


def test_a_change_to_the_sample_between_steps_carries_into_the_result_as_in_diffusers():
    """The finding: with replay, a change δ to the latents between two steps changed the result by 0."""
    from difflab.interop.diffusers.scheduler import DifflabScheduler
    model = _tiny_unet_at_fixed_t()

    def run(scheduler, delta):
        scheduler.set_timesteps(6)
        x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.step(model(x, t), t, x).prev_sample + (delta if i == 2 else 0)
        return x

    delta = 1e-3 * torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    effects = []
    for scheduler in (DifflabScheduler(**SD_TABLE, final_sigmas_type="zero"),
                      diffusers.DPMSolverMultistepScheduler(**SD_TABLE, use_karras_sigmas=True)):
        effects.append(float((run(scheduler, delta) - run(scheduler, 0)).abs().max() / delta.abs().max()))
    assert effects[0] > 0.1                                   # measured ≈ diffusers' own (1.2× δ on SD's table)
    assert abs(effects[0] - effects[1]) < 1e-2 * effects[1]
