"""`DifflabScheduler`: difflab's deterministic solvers as a diffusers scheduler.

    pipe.scheduler = DifflabScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m")

difflab solvers call `denoiser(x, sigma)` synchronously; a diffusers pipeline instead drives the
scheduler one model evaluation at a time (`set_timesteps(n)`, then for each t in `timesteps`:
`out = unet(sample, t)`, `sample = step(out, t, sample).prev_sample`). The bridge is *replay*: the
scheduler keeps the denoised values D (x0, in σ-space) of every evaluation so far; each `step()`
re-runs the unchanged solver from the stored initial state with a proxy denoiser that answers the
first k calls from that cache and, at call k + 1, stops the solver with the (x_σ, σ) it asks for.
That request is the next sample the pipeline evaluates; when the solver returns instead, its
result is the final sample. Replays cost tensor arithmetic only (O(N²) element-wise operations for
N evaluations), never a model call, so the pipeline spends exactly `num_inference_steps` (= NFE)
model calls.

Scales: the pipeline's state is in VP scale, x_vp = x_σ/sqrt(1 + σ²) (so `init_noise_sigma` = 1
and pure noise x_vp ~ N(0, I) is x_σ = sqrt(1 + σ_max²)·x_vp); σ ↔ (fractional) timestep and the
model output → D conversion are `VPDenoiser`'s, on this scheduler's ᾱ table.

Limitations: the solver's own state is authoritative, so a pipeline that edits the latents between
steps (inpainting blends, img2img starting part-way down the timesteps) is not followed; with
`afs=True` the first evaluation is not at the initial noise, so the pipeline must call
`scale_model_input` (Stable Diffusion pipelines do; DDPMPipeline does not: `step` refuses).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from difflab.core.denoiser import append_dims
from difflab.core.wrappers import VPDenoiser, interp, vp_scale
from difflab.core.errors import ConfigError, UnknownNameError
from difflab.amed.predictor import AMEDParams, amed_points, predictor_sigmas
from difflab.amed.plugin import amed_plugin, check_base
from difflab.sampling.grids import alphas_cumprod_for, get_sigmas
from difflab.sampling.sample import sample as run_solver
from difflab.sampling.sample import sigmas_for_nfe
from difflab.sampling.registry import SOLVERS

try:  # diffusers is an optional dependency of difflab
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
except ImportError as err:  # pragma: no cover - exercised only without diffusers
    raise ImportError("difflab.interop.diffusers.scheduler needs diffusers: pip install diffusers") from err

class StepConstantPredictor(nn.Module):
    """AMED (r, c, a) constants per step: step i is found from sigma_cur among the grid's levels."""

    def __init__(self, sigmas: Tensor, r: list[float], c: list[float], a: list[float]):
        super().__init__()
        self.log_sigmas = torch.as_tensor(sigmas, dtype=torch.float64)[:-1].log()
        self.r, self.c, self.a = list(r), list(c), list(a)
        self.fitted_for: dict = {}

    def forward(self, feature: Tensor | None, sigma_cur: Tensor, sigma_next: Tensor) -> AMEDParams:
        i = int((self.log_sigmas - math.log(float(sigma_cur.flatten()[0]))).abs().argmin())
        full = lambda v: torch.full_like(sigma_cur, v)  # noqa: E731
        return AMEDParams(full(self.r[i]), full(self.c[i]), full(self.a[i]))


class _Request(Exception):
    """Raised by the replay proxy at the first call it has no cached answer for."""

    def __init__(self, x: Tensor, sigma: Tensor):
        super().__init__()
        self.x, self.sigma = x, sigma


class _ReplayDenoiser:
    """Answers the solver's calls from `cached` D values in order, then stops it with a _Request."""

    def __init__(self, cached: list[Tensor]):
        self.cached, self.calls = cached, 0

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        if self.calls == len(self.cached):
            raise _Request(x, sigma)
        self.calls += 1
        return self.cached[self.calls - 1]


class _RecordingDenoiser:
    """Records the σ of each call and answers D = 0 (the σ's of a deterministic solver do not depend on x)."""

    def __init__(self):
        self.sigmas: list[float] = []

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        self.sigmas.append(float(sigma.flatten()[0]))
        return torch.zeros_like(x)


class _Output(nn.Module):
    """A 'model' returning a given output: VPDenoiser around it converts that output to D."""

    def __init__(self):
        super().__init__()
        self.output: Tensor | None = None

    def forward(self, x_vp: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.output


@dataclass
class _Done:
    x: Tensor


class DifflabScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running a difflab solver (any deterministic name in `SOLVERS`, or
    "amed" with per-step constants (r, c, a) on the base solver `amed_base`: dpm2 = AMED-Solver, or
    AMED-Plugin on euler, ipndm, dpmpp_2m, dpmpp_3m, unipc) on a VP / DDPM model.
    `num_inference_steps` is the NFE. `amed_scheduler_config(predictor)` gives the amed_* entries
    of a predictor fitted on a black-box model (per-step constants)."""

    _compatibles = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                    "UniPCMultistepScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
                    "LMSDiscreteScheduler", "DEISMultistepScheduler"]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", solver: str = "dpmpp_2m", grid: str = "karras",
                 rho: float = 7.0, afs: bool = False, sigma_min: float | None = None,
                 sigma_max: float | None = None, amed_r: list[float] | None = None,
                 amed_c: list[float] | None = None, amed_a: list[float] | None = None, amed_base: str = "dpm2"):
        self.alphas_cumprod = alphas_cumprod_for(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                 trained_betas)
        self._output = _Output()
        self._vp = VPDenoiser(self._output, self.alphas_cumprod, prediction_type)   # ConfigError if unknown
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.zeros(0)
        self.sigmas = torch.zeros(0)
        self._reset()

    # ----- σ ↔ t ------------------------------------------------------------------------------
    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return self._vp.sigma_to_t(sigma.to(self._vp.log_sigmas.device)).to(sigma.device)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """σ at a (fractional) timestep: log σ interpolated linearly in t (the inverse of sigma_to_t)."""
        t = torch.as_tensor(t, dtype=torch.float64).cpu()
        steps = torch.arange(len(self._vp.log_sigmas), dtype=torch.float64)
        return interp(t.reshape(-1), steps, self._vp.log_sigmas.cpu()).exp().reshape(t.shape)

    # ----- the grid ---------------------------------------------------------------------------
    def _grid(self, nfe: int) -> Tensor:
        cfg = self.config
        sigma_min = self._vp.sigma_min if cfg.sigma_min is None else cfg.sigma_min
        sigma_max = self._vp.sigma_max if cfg.sigma_max is None else cfg.sigma_max
        if cfg.solver == "amed":
            check_base(cfg.amed_base)
            return get_sigmas(cfg.grid, amed_points(nfe, cfg.afs), sigma_min, sigma_max, cfg.rho)
        if cfg.solver not in SOLVERS:
            raise UnknownNameError(f"unknown solver {cfg.solver!r}; choose one of {sorted(SOLVERS) + ['amed']}")
        if SOLVERS[cfg.solver].stochastic:
            raise ConfigError(f"solver {cfg.solver!r} is stochastic; DifflabScheduler replays the solver and needs a "
                              "deterministic one (e.g. dpmpp_2m, heun, ipndm, unipc)")
        return sigmas_for_nfe(cfg.solver, nfe, cfg.grid, sigma_min, sigma_max, cfg.rho, cfg.afs, to_zero=False)

    def _amed_predictor(self, sigmas: Tensor) -> StepConstantPredictor:
        steps = len(sigmas) - 1
        cfg = self.config
        consts = {}
        for name, default in (("amed_r", 0.5), ("amed_c", 1.0), ("amed_a", 1.0)):
            values = getattr(cfg, name)
            values = [default] * steps if values is None else list(values)
            if len(values) != steps:
                raise ConfigError(f"{name} has {len(values)} values; the AMED grid for this NFE has {steps} steps "
                                  "(one value per step)")
            consts[name] = values
        return StepConstantPredictor(sigmas, consts["amed_r"], consts["amed_c"], consts["amed_a"])

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, **kwargs: Any):
        """Build the grid on which the solver spends exactly `num_inference_steps` evaluations, and the
        (fractional) timesteps of those evaluations."""
        grid = self._grid(num_inference_steps)
        self._grid_sigmas = grid
        self._predictor = self._amed_predictor(grid) if self.config.solver == "amed" else None
        recorder = _RecordingDenoiser()
        self._solve(recorder, torch.zeros(1, 1, dtype=torch.float64))
        if len(recorder.sigmas) != num_inference_steps:   # a solver whose NFE formula disagrees with its calls
            raise ConfigError(f"solver {self.config.solver!r} made {len(recorder.sigmas)} evaluations on a grid "
                              f"built for {num_inference_steps}")
        eval_sigmas = torch.tensor(recorder.sigmas, dtype=torch.float64)
        t_dtype = torch.float32 if device is not None and torch.device(device).type == "mps" else torch.float64
        self.num_inference_steps = num_inference_steps
        self.timesteps = self.sigma_to_t(eval_sigmas).to(device=device, dtype=t_dtype)
        self.sigmas = torch.cat([eval_sigmas, grid[-1:]]).to(device)   # evaluation σ's, then the final σ
        self._reset()

    # ----- the replay -------------------------------------------------------------------------
    def _reset(self) -> None:
        self._x_init: Tensor | None = None
        self._cached: list[Tensor] = []
        self._pending: _Request | None = None
        self._scaled_first = False

    def _solve(self, denoiser, x: Tensor) -> Tensor:
        if self.config.solver == "amed":
            return amed_plugin(denoiser, x, self._grid_sigmas, self._predictor, base=self.config.amed_base,
                               afs=self.config.afs, check=False)
        return run_solver(denoiser, x, self._grid_sigmas, solver=self.config.solver, afs=self.config.afs)

    def _replay(self, x_init: Tensor, cached: list[Tensor]) -> _Request | _Done:
        try:
            return _Done(self._solve(_ReplayDenoiser(cached), x_init))
        except _Request as request:
            return request

    def _initial_state(self, sample: Tensor) -> Tensor:
        return sample / vp_scale(float(self._grid_sigmas[0]))            # x_σ = x_vp/α

    @staticmethod
    def _to_vp(x: Tensor, sigma: Tensor | float) -> Tensor:
        return vp_scale(torch.as_tensor(sigma, dtype=x.dtype, device=x.device), x.ndim) * x

    def _check_ready(self) -> None:
        if self.num_inference_steps is None:
            raise ConfigError("call set_timesteps(num_inference_steps) before stepping the scheduler")

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The sample unchanged, except with AFS at the first evaluation: the initial noise moved by
        the analytical first step to the state the solver first evaluates."""
        self._check_ready()
        if not (self.config.afs and self._x_init is None):
            return sample
        self._scaled_first = True
        request = self._replay(self._initial_state(sample), [])
        if isinstance(request, _Done):   # pragma: no cover - a solver always evaluates at least once
            return sample
        return self._to_vp(request.x, request.sigma).to(sample.dtype)

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, return_dict: bool = True,
             generator: torch.Generator | None = None, **kwargs: Any) -> SchedulerOutput | tuple[Tensor]:
        """Take the model's output at the pending request, and return the next request (VP scale),
        or after the last evaluation the solver's result at the grid's last σ (VP scale)."""
        self._check_ready()
        if self._x_init is None:
            if self.config.afs and not self._scaled_first:
                raise ConfigError("afs=True: the first evaluation is not at the initial noise, so the pipeline must "
                                  "call scheduler.scale_model_input(sample, t) before the model (DDPMPipeline does "
                                  "not); use afs=False with this pipeline")
            self._x_init = self._initial_state(sample)
            self._pending = self._replay(self._x_init, [])
        if not isinstance(self._pending, _Request):
            raise ConfigError(f"step() called more than num_inference_steps={self.num_inference_steps} times; "
                              "call set_timesteps again to start a new sample")
        x, sigma = self._pending.x, self._pending.sigma
        if self._vp.log_sigmas.device != x.device:
            self._vp.to(x.device)
        self._output.output = model_output.to(x.dtype)
        with torch.no_grad():
            denoised = self._vp(x, sigma)                # VPDenoiser's ε / v / x0 → D conversion
        self._output.output = None
        self._cached.append(denoised)
        self._pending = self._replay(self._x_init, self._cached)
        if isinstance(self._pending, _Done):
            prev = self._to_vp(self._pending.x, float(self._grid_sigmas[-1]))
        else:
            prev = self._to_vp(self._pending.x, self._pending.sigma)
        prev = prev.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    # ----- training-time helpers --------------------------------------------------------------
    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε (DDPM eq. 4) = (x0 + σ_t ε)/sqrt(1 + σ_t²); fractional t allowed."""
        sigma = self.t_to_sigma(torch.as_tensor(timesteps).flatten())
        sigma = append_dims(sigma.to(original_samples.device, original_samples.dtype), original_samples.ndim)
        return vp_scale(sigma) * (original_samples + sigma * noise)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def amed_scheduler_config(predictor: nn.Module) -> dict[str, Any]:
    """The DifflabScheduler settings that run a fitted AMED predictor as per-step constants:
    solver "amed", its base solver, grid, ρ, σ range, AFS and amed_r / amed_c / amed_a (one value per
    step, the predictor evaluated with no feature, h = 0).

    Exact for a predictor fitted on a black-box model (no `last_feature`: `fit_amed` then learns
    per-step constants); for one fitted with a bottleneck feature this drops the per-sample part.
        scheduler = DifflabScheduler.from_config(pipe.scheduler.config, **amed_scheduler_config(predictor))
    """
    fitted = predictor.fitted_for
    sigmas = predictor_sigmas(predictor)
    with torch.no_grad():
        params = predictor(None, sigmas[:-1].float(), sigmas[1:].float())
    return {"solver": "amed", "amed_base": check_base(fitted.get("base_solver") or "dpm2"), "grid": fitted["grid"],
            "rho": fitted.get("rho", 7.0), "sigma_min": fitted["sigma_min"], "sigma_max": fitted["sigma_max"],
            "afs": fitted.get("afs", True), "amed_r": params.r.tolist(), "amed_c": params.c.tolist(),
            "amed_a": params.a.tolist()}


__all__ = ["DifflabScheduler", "StepConstantPredictor", "alphas_cumprod_for", "amed_scheduler_config"]
