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
from difflab.amed.predictor import AMEDParams, amed_solver, predictor_sigmas
from difflab.core.errors import ConfigError, UnknownNameError
from difflab.core.wrappers import VPDenoiser
from difflab.sampling import get_sigmas, sigmas_for_nfe

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
        steps = np.arange(len(self.log_sigmas))
        sigma = torch.from_numpy(np.exp(np.interp(t.detach().numpy(), steps, self.log_sigmas)))
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
                                              ("heun", 8, False), ("dpm2", 6, False), ("dpmpp_2m", 5, True),
                                              ("ipndm_v", 7, False), ("ab_variable", 7, False), ("deis", 7, False)])
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
    from difflab.amed.fit import AMEDConfig, fit_amed
    from difflab.amed.plugin import amed_plugin
    from difflab.interop.diffusers.scheduler import amed_scheduler_config

    table = DifflabScheduler().alphas_cumprod
    vp = VPDenoiser(MixtureEpsModel(mix2d.model, table), table)
    config = AMEDConfig(nfe=5, trajectories=96, batch_size=32, base_solver="ipndm", M=3)
    predictor = fit_amed(vp, config, shape=(2,)).model
    settings = amed_scheduler_config(predictor, black_box=True)   # fitted on a black box: h = 0 throughout
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


# ----- what pipelines rely on: img2img, fp16 / bf16, constant work per step ------------------------------
SD_TABLE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _tiny_sd_components():
    """A tiny random Stable Diffusion (UNet2DConditionModel + AutoencoderKL, latents 4×8×8 for 8×8 images); the
    prompt is passed as embeddings, so no tokenizer or text encoder is needed (diffusers' Stable Diffusion pipelines
    still import transformers)."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                          layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
                                          attention_head_dim=2,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                  norm_num_groups=4, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",)).eval()
    prompt_embeds = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(1))
    return {"unet": unet, "vae": vae, "text_encoder": None, "tokenizer": None, "safety_checker": None,
            "feature_extractor": None, "requires_safety_checker": False}, prompt_embeds


def test_img2img_pipeline_continues_from_the_noised_image_at_its_begin_index():
    """StableDiffusionImg2ImgPipeline (strength 0.6 of 10 steps: set_begin_index(4), add_noise at timesteps[4])
    gives the solver run on the grid's tail from the state the UNet first sees."""
    components, prompt_embeds = _tiny_sd_components()
    scheduler = DifflabScheduler(**SD_TABLE, solver="dpmpp_2m")
    pipe = diffusers.StableDiffusionImg2ImgPipeline(**components, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    components["unet"].register_forward_pre_hook(lambda module, args: seen.append((args[0].clone(), float(args[1]))))
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    latents = pipe(prompt_embeds=prompt_embeds, image=image, strength=0.6, num_inference_steps=10, guidance_scale=1.0,
                   output_type="latent", generator=torch.Generator().manual_seed(3)).images
    assert scheduler.begin_index == 4 and len(seen) == 6
    grid = sigmas_for_nfe("dpmpp_2m", 10, "karras", scheduler._vp.sigma_min, scheduler._vp.sigma_max)[4:]
    assert seen[0][1] == pytest.approx(float(scheduler.sigma_to_t(grid[:1])), abs=1e-9)

    def unet_eps(x_vp, t):
        with torch.no_grad():
            return components["unet"](x_vp, t, encoder_hidden_states=prompt_embeds).sample
    vp = VPDenoiser(unet_eps, scheduler.alphas_cumprod)
    expected = sample(vp, seen[0][0] * math.sqrt(1 + float(grid[0]) ** 2), grid, solver="dpmpp_2m")
    got = latents * math.sqrt(1 + float(grid[-1]) ** 2)
    assert _relative(got, expected) < 1e-5   # float32 both ways, the same step functions (measured ~1e-7)


HALF_PRECISION_CASES = [({"solver": "dpmpp_2m"}, 6), ({"solver": "amed", "afs": False}, 6),
                        ({"solver": "amed", "afs": False, "amed_base": "ipndm"}, 6), ({"solver": "unipc"}, 6)]


@pytest.mark.parametrize("settings, nfe", HALF_PRECISION_CASES)
def test_stock_pipeline_in_bfloat16_runs_with_stable_diffusions_own_scheduler_config(settings, nfe):
    components, prompt_embeds = _tiny_sd_components()
    sd_config = diffusers.PNDMScheduler(**SD_TABLE, skip_prk_steps=True, steps_offset=1).config
    scheduler = DifflabScheduler.from_config(sd_config, **settings)
    pipe = diffusers.StableDiffusionPipeline(**components, scheduler=scheduler)
    pipe = pipe.to(torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(prompt_embeds=prompt_embeds.bfloat16(),
                   negative_prompt_embeds=torch.zeros_like(prompt_embeds).bfloat16(),
                   num_inference_steps=nfe, guidance_scale=2.0, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.dtype == torch.bfloat16 and latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


@pytest.mark.parametrize("settings, nfe", HALF_PRECISION_CASES)
def test_step_keeps_the_solver_state_in_float32_for_half_precision_samples(settings, nfe):
    def run(dtype):
        scheduler = DifflabScheduler(**SD_TABLE, **settings)
        scheduler.set_timesteps(nfe)
        x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)).to(dtype)
        outputs = []
        for t in scheduler.timesteps:
            x = scheduler.step(torch.tanh(x.float()).to(dtype), t, x).prev_sample
            outputs.append(x)
        return outputs
    exact, half = run(torch.float64), run(torch.bfloat16)
    assert all(x.dtype == torch.bfloat16 for x in half)
    # bf16 holds 8 significant bits (relative round-off 2^-9 per stored sample): the float32 state keeps the
    # error at that level, where a bf16 state would accumulate it over the history
    assert _relative(half[-1].double(), exact[-1]) < 2e-2


def test_sigma_range_ends_within_bf16_round_off_of_the_table_are_snapped_onto_it():
    from difflab.core.errors import SigmaRangeError
    table_max = DifflabScheduler(**SD_TABLE)._vp.sigma_max                          # 14.6146
    rounded = float(torch.tensor(table_max, dtype=torch.bfloat16))                   # 14.625
    scheduler = DifflabScheduler(**SD_TABLE, sigma_max=rounded)
    scheduler.set_timesteps(5)
    assert float(scheduler.sigmas[0]) == pytest.approx(table_max, rel=1e-12)
    with pytest.raises(SigmaRangeError, match="outside the model's table range"):
        DifflabScheduler(**SD_TABLE, sigma_max=16.0).set_timesteps(5)


@pytest.mark.parametrize("kwargs, begin, match", [
    ({"solver": "heun"}, 3, "second of a step"),            # heun: evaluations (σ0, σ1), (σ1, σ2), ...
    ({"solver": "dpmpp_2m", "afs": True}, 2, "afs=True"),
    ({"solver": "dpmpp_2m"}, 12, "outside the 8 timesteps"),
])
def test_a_begin_index_the_solver_cannot_start_from_is_refused(kwargs, begin, match):
    scheduler = DifflabScheduler(**kwargs)
    scheduler.set_timesteps(8 if kwargs.get("solver") != "dpmpp_2m" or not kwargs.get("afs") else 7)
    with pytest.raises(ConfigError, match=match):
        scheduler.set_begin_index(begin)


@pytest.mark.parametrize("solver", ["heun", "unipc"])
def test_starting_at_a_begin_index_is_the_solver_on_the_grids_tail(mix2d, solver):
    scheduler = DifflabScheduler(solver=solver)
    scheduler.set_timesteps(8)
    begin = 4
    scheduler.set_begin_index(begin)
    model = MixtureEpsModel(mix2d.model, scheduler.alphas_cumprod)
    x_vp = torch.randn(16, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for t in scheduler.timesteps[begin:]:
        x_vp = scheduler.step(model(x_vp, t), t, x_vp).prev_sample
    vp = VPDenoiser(MixtureEpsModel(mix2d.model, scheduler.alphas_cumprod), scheduler.alphas_cumprod)
    grid = sigmas_for_nfe(solver, 8, "karras", vp.sigma_min, vp.sigma_max)
    tail = grid[2:] if solver == "heun" else grid[4:]          # heun: two evaluations per step
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    expected = sample(vp, x0 * math.sqrt(1 + float(tail[0]) ** 2), tail, solver=solver)
    assert _relative(x_vp * math.sqrt(1 + float(tail[-1]) ** 2), expected) < 1e-6


def test_each_step_is_one_solver_step_not_a_replay(monkeypatch):
    """A replay bridge re-runs all earlier steps at each step (O(N²) step-function calls); a carried state, N."""
    import difflab.interop.diffusers.scheduler as module
    calls = []
    original = module.dpmpp_step
    monkeypatch.setattr(module, "dpmpp_step", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    scheduler = DifflabScheduler(solver="dpmpp_2m")
    scheduler.set_timesteps(40)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in scheduler.timesteps:
        x = scheduler.step(0.5 * x, t, x).prev_sample
    assert len(calls) == 40


def test_an_amed_predictor_with_a_feature_input_is_refused_not_reduced_to_constants():
    from difflab.amed.predictor import AMEDPredictor
    from difflab.interop.diffusers.scheduler import amed_scheduler_config
    predictor = AMEDPredictor(nfe=5, grid="karras", sigma_min=0.01, sigma_max=80.0, base_solver="dpm2")
    with pytest.raises(ConfigError, match="per sample from the denoiser's bottleneck feature"):
        amed_scheduler_config(predictor)
    assert amed_scheduler_config(predictor, black_box=True)["solver"] == "amed"


def test_difflab_exports_the_scheduler_lazily():
    import subprocess
    import sys
    code = ("import sys, difflab; assert 'diffusers' not in sys.modules; "
            "from difflab.interop.diffusers.scheduler import DifflabScheduler as S; "
            "assert difflab.DifflabScheduler is S")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_add_noise_at_an_amed_intermediate_timestep_noises_to_the_states_sigma_not_the_models():
    """Inpainting blends the known region with add_noise(x0, ε, timesteps[k + 1]) between steps: at AMED's
    intermediate evaluation the model sees a·s but the sample is at s, so the blend must be at s."""
    a = [0.9, 0.8, 0.95]
    scheduler = DifflabScheduler(solver="amed", afs=False, amed_r=[0.5] * 3, amed_c=[1.0] * 3, amed_a=a)
    scheduler.set_timesteps(6)
    intermediate = [k for k, evaluation in enumerate(scheduler._plan) if evaluation.stage == 1]
    assert intermediate                                       # AMED-Solver: one intermediate evaluation per step
    k = intermediate[1]
    state_sigma, model_sigma = scheduler._plan[k].sigma, scheduler._plan[k].sigma_model
    assert model_sigma == pytest.approx(a[1] * state_sigma)   # the case in point: they differ by a
    x0, noise = torch.zeros(1, 4), torch.ones(1, 4)
    noisy = scheduler.add_noise(x0, noise, scheduler.timesteps[k:k + 1])
    # x_vp = (x0 + σ ε)/sqrt(1 + σ²) with the state's σ
    expected = state_sigma / math.sqrt(1 + state_sigma**2)
    torch.testing.assert_close(noisy, torch.full((1, 4), expected), rtol=1e-6, atol=0)
