"""DifflabScheduler: difflab solvers driven step by step by a diffusers pipeline (replay bridge).

The exact target: a loop shaped like a diffusers pipeline's, over an ε-prediction VP model made
from the analytic mixture, must give the same final state as `difflab.sample` (or `amed_solver`)
run synchronously on `VPDenoiser(the same model, the same ᾱ)` from the same noise and grid, with
exactly num_inference_steps model calls at the same timesteps.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab import eps, sample
from difflab.core.wrappers import VPDenoiser
from difflab.core.errors import ConfigError, UnknownNameError
from difflab.sampling import get_sigmas, sigmas_for_nfe
from difflab.amed.predictor import AMEDParams, amed_solver, predictor_sigmas

diffusers = pytest.importorskip("diffusers")
from difflab.interop.diffusers.scheduler import DifflabScheduler  # noqa: E402


class MixtureEpsModel:
    """ε̂(x_vp, t) of the mixture on a DDPM ᾱ table: σ(t) by interpolating log σ_t linearly in t
    (numpy, independently of difflab), x_σ = x_vp·sqrt(1 + σ²), ε̂ = (x_σ − D(x_σ; σ))/σ.
    Records every timestep it is called at."""

    def __init__(self, mixture, alphas_cumprod: torch.Tensor):
        a_bar = alphas_cumprod.double().numpy()
        self.log_sigmas = 0.5 * np.log((1 - a_bar) / a_bar)
        self.mixture, self.ts = mixture, []

    def __call__(self, x_vp: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x_vp.shape[0])
        self.ts.append(float(t[0]))   # (numpy σ(t): fitting through this model gets no gradient via t)
        sigma = torch.from_numpy(np.exp(np.interp(t.detach().numpy(), np.arange(len(self.log_sigmas)), self.log_sigmas)))
        x = x_vp * torch.sqrt(1 + sigma[:, None] ** 2)
        return eps(self.mixture, x, sigma)


def _pipeline_loop(scheduler: DifflabScheduler, model, x_vp: torch.Tensor, nfe: int) -> torch.Tensor:
    """What a diffusers pipeline does (Stable Diffusion's loop shape: scale_model_input, model, step)."""
    scheduler.set_timesteps(nfe)
    x_vp = x_vp * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x_vp, t), t)
        x_vp = scheduler.step(out, t, x_vp).prev_sample
    return x_vp


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("solver, nfe, afs", [("dpmpp_2m", 6, False), ("ipndm", 7, False), ("unipc", 6, False),
                                              ("heun", 8, False), ("dpm2", 6, False), ("dpmpp_2m", 5, True)])
def test_scheduler_replays_the_solver_exactly(mix2d, solver, nfe, afs):
    scheduler = DifflabScheduler(solver=solver, afs=afs)   # DDPM linear table, T = 1000
    x_vp = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = MixtureEpsModel(mix2d.model, scheduler.alphas_cumprod)
    out_vp = _pipeline_loop(scheduler, model, x_vp, nfe)
    assert len(model.ts) == nfe == len(scheduler.timesteps)

    reference_model = MixtureEpsModel(mix2d.model, scheduler.alphas_cumprod)
    vp = VPDenoiser(reference_model, scheduler.alphas_cumprod)
    sigmas = sigmas_for_nfe(solver, nfe, "karras", vp.sigma_min, vp.sigma_max, afs=afs)
    x0 = x_vp * math.sqrt(1 + float(sigmas[0]) ** 2)
    expected = sample(vp, x0, sigmas, solver=solver, afs=afs)
    got = out_vp * math.sqrt(1 + float(sigmas[-1]) ** 2)     # back from VP scale at σ_min
    assert _relative(got, expected) < 1e-6
    np.testing.assert_allclose(model.ts, reference_model.ts, rtol=1e-9)   # same evaluations, same order
    if solver == "heun":   # two evaluations per step: each interior grid level twice (corrector, next step)
        assert len(set(np.round(model.ts, 9))) == len(sigmas)
    if solver == "dpm2":   # the log-midpoints lie off the grid's own levels
        grid_ts = vp.sigma_to_t(sigmas).tolist()
        assert sum(min(abs(t - g) for g in grid_ts) > 1 for t in model.ts) == len(sigmas) - 1


@pytest.mark.parametrize("afs, nfe", [(False, 6), (True, 5)])
def test_scheduler_runs_amed_with_per_step_constants(mix2d, afs, nfe):
    r, c, a = [0.3, 0.5, 0.7], [1.0, 0.99, 1.01], [1.0, 0.98, 1.0]
    scheduler = DifflabScheduler(solver="amed", afs=afs, amed_r=r, amed_c=c, amed_a=a)
    x_vp = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = MixtureEpsModel(mix2d.model, scheduler.alphas_cumprod)
    out_vp = _pipeline_loop(scheduler, model, x_vp, nfe)
    assert len(model.ts) == nfe

    class CountingStepPredictor(torch.nn.Module):   # step i's constants by call count, not by σ
        def __init__(self):
            super().__init__()
            self.i, self.fitted_for = 0, {}

        def forward(self, feature, sigma_cur, sigma_next):
            i, self.i = self.i, self.i + 1
            return AMEDParams(*(torch.full_like(sigma_cur, v[i]) for v in (r, c, a)))

    vp = VPDenoiser(MixtureEpsModel(mix2d.model, scheduler.alphas_cumprod), scheduler.alphas_cumprod)
    sigmas = get_sigmas("karras", 4, vp.sigma_min, vp.sigma_max)   # 3 steps: 2·3 − afs evaluations
    x0 = x_vp * math.sqrt(1 + float(sigmas[0]) ** 2)
    expected = amed_solver(vp, x0, sigmas, CountingStepPredictor(), afs=afs, check=False)
    got = out_vp * math.sqrt(1 + float(sigmas[-1]) ** 2)
    assert _relative(got, expected) < 1e-6
    # the constants matter: DPM-Solver-2 constants on the same grid land elsewhere
    plain = DifflabScheduler(solver="amed", afs=afs)
    other = _pipeline_loop(plain, MixtureEpsModel(mix2d.model, plain.alphas_cumprod), x_vp, nfe)
    assert _relative(other, out_vp) > 1e-4


def test_a_fitted_plugin_predictor_runs_in_the_scheduler_as_per_step_constants(mix2d):
    """AMED-Plugin on iPNDM fitted on a black-box VP model (h = 0: per-step constants) gives, through
    amed_scheduler_config, the same final state in a diffusers loop as amed_plugin with the predictor."""
    from difflab.interop.diffusers.scheduler import amed_scheduler_config
    from difflab.amed.plugin import amed_plugin
    from difflab.amed.fit import fit_amed

    table = DifflabScheduler().alphas_cumprod
    vp = VPDenoiser(MixtureEpsModel(mix2d.model, table), table)
    predictor = fit_amed(vp, nfe=5, trajectories=96, batch_size=32, shape=(2,), base_solver="ipndm", M=3)
    settings = amed_scheduler_config(predictor)
    assert settings["amed_base"] == "ipndm" and len(settings["amed_r"]) == 3
    scheduler = DifflabScheduler(**settings)
    x_vp = torch.randn(16, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out_vp = _pipeline_loop(scheduler, MixtureEpsModel(mix2d.model, table), x_vp, 5)
    sigmas = predictor_sigmas(predictor)
    with torch.no_grad():
        expected = amed_plugin(vp, x_vp * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, predictor, base="ipndm")
    assert _relative(out_vp * math.sqrt(1 + float(sigmas[-1]) ** 2), expected) < 1e-5
    plain = DifflabScheduler(**{**settings, "amed_r": None, "amed_c": None, "amed_a": None})
    other = _pipeline_loop(plain, MixtureEpsModel(mix2d.model, table), x_vp, 5)
    assert _relative(other, out_vp) > 1e-5      # the fitted constants are not ½, 1, 1


def test_scheduler_converts_v_prediction_as_vp_denoiser_does(mix2d):
    scheduler = DifflabScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", solver="unipc")
    eps_model = MixtureEpsModel(mix2d.model, scheduler.alphas_cumprod)

    def v_model(x_vp, t):   # v = α·ε − s·x0 with α = sqrt(ᾱ), s = sqrt(1 − ᾱ) and x0 = (x_vp − s·ε)/α
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x_vp.shape[0])
        log_sigma = np.interp(t.numpy(), np.arange(len(eps_model.log_sigmas)), eps_model.log_sigmas)
        sigma = torch.from_numpy(np.exp(log_sigma))[:, None]
        alpha, s = 1 / torch.sqrt(1 + sigma**2), sigma / torch.sqrt(1 + sigma**2)
        e = eps_model(x_vp, t)
        return alpha * e - s * (x_vp - s * e) / alpha

    x_vp = torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out_vp = _pipeline_loop(scheduler, v_model, x_vp, 8)
    vp = VPDenoiser(v_model, scheduler.alphas_cumprod, "v_prediction")
    sigmas = sigmas_for_nfe("unipc", 8, "karras", vp.sigma_min, vp.sigma_max)
    expected = sample(vp, x_vp * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, solver="unipc")
    assert _relative(out_vp * math.sqrt(1 + float(sigmas[-1]) ** 2), expected) < 1e-6
    eps_vp = VPDenoiser(MixtureEpsModel(mix2d.model, scheduler.alphas_cumprod), scheduler.alphas_cumprod)
    assert _relative(sample(eps_vp, x_vp * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, solver="unipc"),
                     expected) < 1e-6   # the same model in two parametrisations


def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_stock_ddpm_pipeline_runs_with_the_scheduler(solver):
    unet = _tiny_unet()
    calls = []
    unet.register_forward_hook(lambda module, args, output: calls.append(1))
    scheduler = DifflabScheduler.from_config(diffusers.DDPMScheduler().config, solver=solver)
    assert scheduler.config.solver == solver and scheduler.config.beta_schedule == "linear"
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    assert len(calls) == 5


def test_ddpm_pipeline_with_afs_is_refused_without_scale_model_input():
    pipe = diffusers.DDPMPipeline(unet=_tiny_unet(), scheduler=DifflabScheduler(solver="dpmpp_2m", afs=True))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ConfigError, match="scale_model_input"):
        pipe(batch_size=1, num_inference_steps=4, output_type="np")


def test_config_round_trips_through_save_pretrained(tmp_path):
    scheduler = DifflabScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                 prediction_type="v_prediction", solver="amed", afs=True, rho=5.0,
                                 amed_r=[0.4, 0.5, 0.6], amed_c=[1.0, 1.005, 0.995], amed_a=[1.0, 1.0, 0.99])
    scheduler.save_pretrained(tmp_path)
    loaded = DifflabScheduler.from_pretrained(tmp_path)
    for key in ("beta_schedule", "beta_start", "beta_end", "prediction_type", "solver", "afs", "rho",
                "amed_r", "amed_c", "amed_a", "grid", "sigma_min", "sigma_max"):
        assert loaded.config[key] == scheduler.config[key], key
    assert torch.equal(loaded.alphas_cumprod, scheduler.alphas_cumprod)
    scheduler.set_timesteps(5)
    loaded.set_timesteps(5)
    assert torch.equal(loaded.timesteps, scheduler.timesteps)


@pytest.mark.parametrize("kwargs, nfe, error, match", [
    ({"solver": "no_such_solver"}, 5, UnknownNameError, "unknown solver"),
    ({"solver": "euler_maruyama"}, 5, ConfigError, "stochastic"),
    ({"solver": "heun"}, 5, ConfigError, "cannot spend exactly 5"),        # heun spends 2 per step
    ({"solver": "amed"}, 6, ConfigError, "cannot spend exactly 6"),         # with AFS: odd budgets only
    ({"solver": "amed", "afs": False, "amed_r": [0.5, 0.5]}, 6, ConfigError, "amed_r has 2 values"),
    ({"grid": "no_such_grid"}, 5, UnknownNameError, "unknown grid"),
])
def test_bad_config_is_refused_at_set_timesteps(kwargs, nfe, error, match):
    if kwargs.get("solver") == "amed" and "afs" not in kwargs:
        kwargs = {**kwargs, "afs": True}
    scheduler = DifflabScheduler(**kwargs)
    with pytest.raises(error, match=match):
        scheduler.set_timesteps(nfe)


def test_bad_table_options_are_refused_at_construction():
    with pytest.raises(UnknownNameError, match="beta_schedule"):
        DifflabScheduler(beta_schedule="cubic")
    with pytest.raises(ConfigError, match="prediction_type"):
        DifflabScheduler(prediction_type="velocity")


def test_add_noise_is_ddpm_forward_process_and_matches_ddpm_table():
    scheduler = DifflabScheduler()
    ddpm = diffusers.DDPMScheduler()
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), ddpm.alphas_cumprod.double().numpy(), rtol=1e-5)
    x0 = torch.randn(3, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    t = torch.tensor([0, 400, 999])
    a_bar = scheduler.alphas_cumprod[t][:, None]
    expected = a_bar.sqrt() * x0 + (1 - a_bar).sqrt() * noise            # DDPM eq. (4)
    assert torch.allclose(scheduler.add_noise(x0, noise, t), expected, rtol=1e-10, atol=1e-12)
    assert len(scheduler) == 1000
