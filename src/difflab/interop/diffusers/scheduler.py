"""`DifflabScheduler`: difflab's deterministic solvers as a diffusers scheduler.

    pipe.scheduler = DifflabScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m")

A diffusers pipeline drives the scheduler one model evaluation at a time (`set_timesteps(n)`, then
for each t in `timesteps`: `out = unet(scale_model_input(sample, t), t)`, `sample = step(out, t,
sample).prev_sample`), and may change `sample` between two steps (inpainting blends the known region
back in; img2img starts part-way down the timesteps with `set_begin_index`). So each solver is taken
as a *stepper* (`_Stepper`): `step(k, x, D)` takes the state x at evaluation k, which is the sample
the pipeline passes, and the model's D there, and returns the state at evaluation k + 1, carrying
only what the solver carries (a multistep history, a two-stage step's start): constant work per
step. The update formulas are the solvers' own single-step functions (`dpmpp_step`, `unipc_step`,
`adams_bashforth_step`, `euler_step`, `heun_step`, `amed_midpoint`/`amed_update`, AMED-Plugin's
sub-step), so `difflab.sample` and the scheduler compute the same thing.

What "the given sample" means per solver follows diffusers' own schedulers: one-evaluation solvers
step from it; UniC corrects the previous step from that step's start (as UniPCMultistepScheduler);
a two-stage step (heun, dpm2, AMED-Solver) takes its slope at the intermediate point from the given
sample and updates from the step's start (as HeunDiscreteScheduler / KDPM2DiscreteScheduler).

Scales: the pipeline's state is in VP scale, x_vp = x_σ/sqrt(1 + σ²) (`init_noise_sigma` = 1, pure
noise x_vp ~ N(0, I)); σ ↔ (fractional) timestep and the model output → D conversion are
`VPDenoiser`'s, on this scheduler's ᾱ table. The solver state inside `step` is float32 for an fp16 /
bf16 sample (float64 stays float64) and is cast back to the sample's dtype on return; σ's stay float64.

`final_sigmas_type` has diffusers' meaning: "zero" puts the NFE evaluations on a grid of NFE levels
from σ_max to σ_min and ends with the step σ_min → 0 (x ← D), exactly as DPMSolverMultistepScheduler /
UniPCMultistepScheduler with Karras sigmas; "sigma_min" ends the grid at σ_min (difflab's grid: NFE + 1
levels, no evaluation at σ_min, where diffusers would spend its last one on a step σ_min → σ_min).

`integer_timesteps=True` gives the model round(t(σ)) instead of the fractional t(σ), as
DPMSolverMultistepScheduler / UniPCMultistepScheduler with Karras sigmas do (the solver's σ's stay on
the grid): with it, and final_sigmas_type="zero", a stock pipeline (txt2img, img2img, inpainting) gives
diffusers' images to float32 round-off. `add_noise` at a scheduled timestep noises to that evaluation's
grid σ (not to σ(round(t))), as diffusers does.

With `afs=True` the first evaluation is not at the initial noise: the pipeline must call
`scale_model_input` (Stable Diffusion pipelines do; DDPMPipeline does not: `step` refuses), and the
sample must start as pure noise (no img2img: `set_begin_index` > 0 is refused).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from difflab.amed.plugin import PLUGIN_BASES, PluginState, Point, check_base, n_substeps_of, plugin_substep
from difflab.amed.predictor import amed_midpoint, amed_nfe, amed_update, predictor_sigmas
from difflab.core.denoiser import append_dims
from difflab.core.errors import ConfigError, SigmaRangeError, UnknownNameError
from difflab.core.wrappers import VPDenoiser, interp, vp_scale
from difflab.sampling.grids import alphas_cumprod_for, get_sigmas, points_for_nfe
from difflab.sampling.multistep import (
    UniPCState,
    adams_bashforth_step,
    deis_weights,
    ipndm_v_weights,
    ipndm_weights,
    lagrange_integrals,
    unipc_step,
)
from difflab.sampling.registry import SOLVERS
from difflab.sampling.sample import LOW_PRECISION, sigmas_for_nfe
from difflab.sampling.solvers import dpm2_midpoint, dpmpp_step, euler_step, heun_step

try:  # diffusers is an optional dependency of difflab
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
except ImportError as err:  # pragma: no cover - exercised only without diffusers
    raise ImportError("difflab.interop.diffusers.scheduler needs diffusers: pip install diffusers") from err

FINAL_SIGMAS_TYPES = ("sigma_min", "zero")
# a configured σ range end this close outside the table (relative) is the table's end after bf16 round-off
# (8 significant bits: half an ulp is 2^-9 relative; 2^-7 leaves margin) and is snapped onto it
TABLE_END_TOLERANCE = 2.0**-7


# ----- solvers one evaluation at a time -----------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    """One model evaluation of a solver on its grid: the state's σ (the solver's level), the σ the model
    sees (differs only at AMED's a·s), the grid interval i and the stage (0: at σ_i, 1: inside the step)."""

    sigma: float
    sigma_model: float
    interval: int
    stage: int = 0


class _Stepper:
    """A solver taken one model evaluation at a time on `grid` (floats, decreasing, may end at 0).

    `evaluations` lists every evaluation (an AFS first one included); `step(k, x, D)` takes the state
    x at evaluation k and D(x; σ) there, and returns the state at evaluation k + 1 (after the last,
    at grid[-1]). The default: one evaluation per interval, at its start.
    """

    two_stage = False

    def __init__(self, grid: list[float]):
        self.grid = grid

    def evaluations(self) -> list[Evaluation]:
        return [Evaluation(sigma, sigma, i) for i, sigma in enumerate(self.grid[:-1])]

    def step(self, k: int, x: Tensor, denoised: Tensor) -> Tensor:
        raise NotImplementedError


class _Euler(_Stepper):
    def step(self, k: int, x: Tensor, denoised: Tensor) -> Tensor:
        sigma = self.grid[k]
        return euler_step(x, sigma, self.grid[k + 1], (x - denoised) / sigma)


class _AdamsBashforth(_Stepper):
    """iPNDM, iPNDM-v, DEIS-tAB: `adams_bashforth_step` with the method's weights and the ε̂ history."""

    def __init__(self, grid: list[float], step_weights, max_order: int):
        super().__init__(grid)
        self.step_weights, self.max_order, self.history = step_weights, max_order, []

    def step(self, k: int, x: Tensor, denoised: Tensor) -> Tensor:
        self.history = [(x - denoised) / self.grid[k]] + self.history[: self.max_order - 1]
        return adams_bashforth_step(x, self.grid, k, self.history, self.step_weights)


class _DPMSolverPP(_Stepper):
    """DPM-Solver++(2M / 3M): `dpmpp_step` with the last three (σ, D)."""

    def __init__(self, grid: list[float], order: int, taylor_d2: bool = False):
        super().__init__(grid)
        self.order, self.taylor_d2, self.history = order, taylor_d2, []

    def step(self, k: int, x: Tensor, denoised: Tensor) -> Tensor:
        self.history = (self.history + [(self.grid[k], denoised)])[-3:]
        return dpmpp_step(x, self.grid[k], self.grid[k + 1], self.history, self.order, k, len(self.grid) - 1,
                          self.taylor_d2)


class _UniPC(_Stepper):
    def __init__(self, grid: list[float]):
        super().__init__(grid)
        self.state = UniPCState()

    def step(self, k: int, x: Tensor, denoised: Tensor) -> Tensor:
        x_next, self.state = unipc_step(x, denoised, self.grid, k, self.state)
        return x_next


class _TwoStage(_Stepper):
    """A step of two evaluations, at σ_i and at an intermediate level (none on a last step to σ = 0):
    stage 0 keeps the step's start, stage 1 finishes the step from it."""

    two_stage = True

    def intermediate(self, i: int) -> tuple[float, float]:
        """(σ of the intermediate state, σ the model sees there)."""
        return self.grid[i + 1], self.grid[i + 1]

    def evaluations(self) -> list[Evaluation]:
        plan = []
        for i, sigma in enumerate(self.grid[:-1]):
            plan.append(Evaluation(sigma, sigma, i, 0))
            if self.grid[i + 1] != 0:
                plan.append(Evaluation(*self.intermediate(i), i, 1))
        self.plan = plan
        return plan

    def step(self, k: int, x: Tensor, denoised: Tensor) -> Tensor:
        evaluation = self.plan[k]
        i, sigma, sigma_next = evaluation.interval, self.grid[evaluation.interval], self.grid[evaluation.interval + 1]
        if evaluation.stage == 0:
            d = (x - denoised) / sigma
            if sigma_next == 0:                                  # last step to σ = 0: x ← D
                return euler_step(x, sigma, sigma_next, d)
            self.start = (x, d)
            return self.first_half(i, x, d)
        x_start, d = self.start
        return self.second_half(i, x_start, d, (x - denoised) / evaluation.sigma)


class _Heun(_TwoStage):
    def first_half(self, i: int, x: Tensor, d: Tensor) -> Tensor:
        return euler_step(x, self.grid[i], self.grid[i + 1], d)

    def second_half(self, i: int, x_start: Tensor, d: Tensor, d_next: Tensor) -> Tensor:
        return heun_step(x_start, self.grid[i], self.grid[i + 1], d, d_next)


class _DPM2(_TwoStage):
    def intermediate(self, i: int) -> tuple[float, float]:
        mid = dpm2_midpoint(self.grid[i], self.grid[i + 1])
        return mid, mid

    def first_half(self, i: int, x: Tensor, d: Tensor) -> Tensor:
        return euler_step(x, self.grid[i], dpm2_midpoint(self.grid[i], self.grid[i + 1]), d)

    def second_half(self, i: int, x_start: Tensor, d: Tensor, d_mid: Tensor) -> Tensor:
        return euler_step(x_start, self.grid[i], self.grid[i + 1], d_mid)


class _AMEDSolver(_TwoStage):
    """AMED-Solver with per-step constants (r, c, a): the intermediate state at s = t_next^r·t_cur^(1−r),
    the model at a·s, the slope divided by s (`amed_step`)."""

    def __init__(self, grid: list[float], r: list[float], c: list[float], a: list[float]):
        super().__init__(grid)
        self.r, self.c, self.a = r, c, a

    def intermediate(self, i: int) -> tuple[float, float]:
        s = self.grid[i + 1] ** self.r[i] * self.grid[i] ** (1 - self.r[i])
        return s, self.a[i] * s

    def first_half(self, i: int, x: Tensor, d: Tensor) -> Tensor:
        return amed_midpoint(x, d, self.grid[i], self.grid[i + 1], self.r[i])[0]

    def second_half(self, i: int, x_start: Tensor, d: Tensor, d_mid: Tensor) -> Tensor:
        return amed_update(x_start, d_mid, self.grid[i], self.grid[i + 1], self.c[i])


class _AMEDPlugin(_AMEDSolver):
    """AMED-Plugin on a multistep base: every evaluation is one of the base's sub-steps on the grid refined
    at s (AMED-Plugin's `plugin_substep`, the second scaled by c), from the given sample."""

    def __init__(self, grid: list[float], base: str, r: list[float], c: list[float], a: list[float]):
        super().__init__(grid, r, c, a)
        self.base, self.n_substeps, self.state = PLUGIN_BASES[base], n_substeps_of(grid), None

    def step(self, k: int, x: Tensor, denoised: Tensor) -> Tensor:
        evaluation = self.plan[k]
        i = evaluation.interval
        point = Point(evaluation.sigma, denoised, (x - denoised) / evaluation.sigma)
        if self.grid[i + 1] == 0:                                # last step to σ = 0: x ← D
            return denoised
        state = PluginState(x, substep=2 * i) if self.state is None else dataclasses.replace(self.state, x=x)
        if evaluation.stage == 0:
            s = self.intermediate(i)[0]
            self.state = plugin_substep(self.base, state, point, s, self.n_substeps)
        else:
            self.state = plugin_substep(self.base, state, point, self.grid[i + 1], self.n_substeps, self.c[i])
        return self.state.x


def make_stepper(solver: str, grid: list[float], amed_base: str = "dpm2", amed_constants=None) -> _Stepper:
    """The stepper of a registered deterministic solver (or "amed" on `amed_base` with (r, c, a) lists)."""
    if solver == "amed":
        base = check_base(amed_base)
        if base == "dpm2":
            return _AMEDSolver(grid, *amed_constants)
        return _AMEDPlugin(grid, base, *amed_constants)
    steppers = {"euler": lambda: _Euler(grid), "heun": lambda: _Heun(grid), "dpm2": lambda: _DPM2(grid),
                "dpmpp_2m": lambda: _DPMSolverPP(grid, 2), "dpmpp_3m": lambda: _DPMSolverPP(grid, 3),
                "dpmpp_3m_taylor": lambda: _DPMSolverPP(grid, 3, taylor_d2=True),
                "ipndm": lambda: _AdamsBashforth(grid, ipndm_weights, 4),
                "ipndm_v": lambda: _AdamsBashforth(grid, ipndm_v_weights, 4),
                "ab_variable": lambda: _AdamsBashforth(grid, lagrange_integrals, 4),
                "deis": lambda: _AdamsBashforth(grid, deis_weights, 3), "unipc": lambda: _UniPC(grid)}
    return steppers[solver]()


class _Output(nn.Module):
    """A 'model' returning a given output: VPDenoiser around it converts that output to D."""

    def __init__(self):
        super().__init__()
        self.output: Tensor | None = None

    def forward(self, x_vp: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.output


# ----- the scheduler --------------------------------------------------------------------------------
class DifflabScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running a difflab solver (any deterministic name in `SOLVERS`, or
    "amed" with per-step constants (r, c, a) on the base solver `amed_base`: dpm2 = AMED-Solver, or
    AMED-Plugin on euler, ipndm, dpmpp_2m, dpmpp_3m, unipc) on a VP / DDPM model.
    `num_inference_steps` is the NFE. `grid_sigmas` (or `from_grid(LearnedGrid)`) replaces the grid family
    by given σ's, on which the solver must spend exactly that NFE. `amed_scheduler_config(predictor)` gives
    the amed_* entries of a predictor fitted on a black-box model (per-step constants). Attribute contract as diffusers'
    pipelines use it: `order`, `init_noise_sigma`, `timesteps`, `sigmas`, `step_index`, `begin_index`,
    `set_begin_index`, `scale_model_input`, `step`, `add_noise`."""

    _compatibles = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                    "UniPCMultistepScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
                    "LMSDiscreteScheduler", "DEISMultistepScheduler"]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: list[float] | None = None,
                 prediction_type: str = "epsilon", solver: str = "dpmpp_2m", grid: str = "karras",
                 rho: float = 7.0, afs: bool = False, sigma_min: float | None = None,
                 sigma_max: float | None = None, final_sigmas_type: str = "sigma_min",
                 amed_r: list[float] | None = None, amed_c: list[float] | None = None,
                 amed_a: list[float] | None = None, amed_base: str = "dpm2", integer_timesteps: bool = False,
                 grid_sigmas: list[float] | None = None):
        if final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ConfigError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {final_sigmas_type!r}")
        self.alphas_cumprod = alphas_cumprod_for(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                 trained_betas)
        self._output = _Output()
        self._vp = VPDenoiser(self._output, self.alphas_cumprod, prediction_type)   # ConfigError if unknown
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.zeros(0)
        self.sigmas = torch.zeros(0)
        self._plan: list[Evaluation] = []
        self._begin_index: int | None = None
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
    def _sigma_range(self) -> tuple[float, float]:
        """(σ_min, σ_max): the configured ones, or the table's ends; a configured end within round-off
        outside the table (e.g. a bf16 copy of it) is snapped onto the table's end."""
        table_min, table_max = self._vp.sigma_min, self._vp.sigma_max

        def inside(name: str, value: float | None, default: float) -> float:
            if value is None:
                return default
            if table_min * (1 - TABLE_END_TOLERANCE) <= value <= table_max * (1 + TABLE_END_TOLERANCE):
                return min(max(float(value), table_min), table_max)
            raise SigmaRangeError(f"{name}={value:.6g} lies outside the model's table range [{table_min:.6g}, "
                                  f"{table_max:.6g}]; leave it None for the table's end or pick a value inside")
        return inside("sigma_min", self.config.sigma_min, table_min), inside("sigma_max", self.config.sigma_max,
                                                                              table_max)

    @classmethod
    def from_grid(cls, grid: nn.Module, **config: Any) -> "DifflabScheduler":
        """A scheduler running a LearnedGrid (difflab.amed.fit_grid): its solver, AFS and σ's (`grid_sigmas`, a
        list in the config, so the scheduler saves and reloads with it); set_timesteps must ask for its NFE."""
        levels = grid.check(None).tolist()       # the σ's its solver runs on (base model checked where it is loaded)
        return cls(**{"solver": grid.solver, "afs": grid.afs, **config, "grid_sigmas": levels})

    def _custom_grid(self) -> Tensor:
        """`grid_sigmas` (decreasing, inside the table's σ range up to round-off), then 0 for final_sigmas_type zero."""
        sigmas = torch.tensor([float(v) for v in self.config.grid_sigmas], dtype=torch.float64)
        low, high = self._vp.sigma_min * (1 - TABLE_END_TOLERANCE), self._vp.sigma_max * (1 + TABLE_END_TOLERANCE)
        if len(sigmas) < 2 or not bool((sigmas.diff() < 0).all()) or sigmas[-1] < low or sigmas[0] > high:
            raise SigmaRangeError(f"grid_sigmas must decrease inside the model's table range "
                                  f"[{self._vp.sigma_min:.6g}, {self._vp.sigma_max:.6g}]; got "
                                  f"{[round(float(v), 6) for v in sigmas]}")
        sigmas = sigmas.clamp(self._vp.sigma_min, self._vp.sigma_max)
        return torch.cat([sigmas, sigmas.new_zeros(1)]) if self.config.final_sigmas_type == "zero" else sigmas

    def _grid(self, nfe: int) -> Tensor:
        cfg = self.config
        if cfg.grid_sigmas is not None:
            return self._custom_grid()
        sigma_min, sigma_max = self._sigma_range()
        to_zero = cfg.final_sigmas_type == "zero"
        if cfg.solver == "amed":
            check_base(cfg.amed_base)
            n = points_for_nfe(nfe, lambda points: amed_nfe(points, to_zero, cfg.afs), "amed")
            sigmas = get_sigmas(cfg.grid, n - int(to_zero), sigma_min, sigma_max, cfg.rho)
            return torch.cat([sigmas, sigmas.new_zeros(1)]) if to_zero else sigmas
        if cfg.solver not in SOLVERS:
            raise UnknownNameError(f"unknown solver {cfg.solver!r}; choose one of {sorted(SOLVERS) + ['amed']}")
        if SOLVERS[cfg.solver].stochastic:
            raise ConfigError(f"solver {cfg.solver!r} is stochastic; DifflabScheduler runs deterministic solvers "
                              "(e.g. dpmpp_2m, heun, ipndm, unipc)")
        return sigmas_for_nfe(cfg.solver, nfe, cfg.grid, sigma_min, sigma_max, cfg.rho, cfg.afs, to_zero=to_zero)

    def _amed_constants(self, n_steps: int) -> list[list[float]]:
        constants = []
        for name, default in (("amed_r", 0.5), ("amed_c", 1.0), ("amed_a", 1.0)):
            values = getattr(self.config, name)
            values = [default] * n_steps if values is None else [float(v) for v in values]
            if len(values) != n_steps:
                raise ConfigError(f"{name} has {len(values)} values; the AMED grid for this NFE has {n_steps} steps "
                                  "(one value per step)")
            constants.append(values)
        return constants

    def _make_stepper(self) -> _Stepper:
        grid = self._grid_sigmas.tolist()
        constants = self._amed_constants(len(grid) - 1) if self.config.solver == "amed" else None
        stepper = make_stepper(self.config.solver, grid, self.config.amed_base, constants)
        stepper.evaluations()
        return stepper

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None, **kwargs: Any):
        """Build the grid on which the solver spends exactly `num_inference_steps` evaluations, and the
        (fractional) timesteps of those evaluations."""
        self._grid_sigmas = self._grid(num_inference_steps)
        plan = self._make_stepper().evaluations()[int(self.config.afs):]   # AFS: the first one is analytic
        if len(plan) != num_inference_steps:   # a solver whose NFE formula disagrees with its stepper
            raise ConfigError(f"solver {self.config.solver!r} makes {len(plan)} evaluations on a grid built for "
                              f"{num_inference_steps}")
        self._plan = plan
        eval_sigmas = torch.tensor([e.sigma_model for e in plan], dtype=torch.float64)
        t_dtype = torch.float32 if device is not None and torch.device(device).type == "mps" else torch.float64
        self.num_inference_steps = num_inference_steps
        timesteps = self.sigma_to_t(eval_sigmas)
        timesteps = timesteps.round() if self.config.integer_timesteps else timesteps
        self.timesteps = timesteps.to(device=device, dtype=t_dtype)
        self.sigmas = torch.cat([eval_sigmas, self._grid_sigmas[-1:]]).to(device)   # evaluation σ's, then the final σ
        self._begin_index = None
        self._reset()

    # ----- where in the schedule --------------------------------------------------------------
    @property
    def step_index(self) -> int | None:
        """The index in `timesteps` of the next evaluation `step` takes (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The index in `timesteps` the pipeline starts from (img2img: set by the pipeline), or None."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at timesteps[begin_index] (diffusers' img2img: the sample there is the image noised to
        that level by `add_noise`); the solver starts afresh there, its order rising as history accumulates."""
        if self._plan:
            self._check_begin(int(begin_index))
        self._begin_index = int(begin_index)

    def _check_begin(self, begin: int) -> None:
        if not 0 <= begin < len(self._plan):
            raise ConfigError(f"begin index {begin} is outside the {len(self._plan)} timesteps of this schedule")
        if begin > 0 and self.config.afs:
            raise ConfigError("afs=True takes an analytical first step from pure noise at sigma_max, so the sample "
                              f"cannot start part-way down the schedule (begin index {begin}: img2img, inpainting "
                              "with strength < 1); use afs=False with this pipeline")
        if begin > 0 and self._plan[begin].stage != 0:
            starts = [k for k, e in enumerate(self._plan) if e.stage == 0]
            raise ConfigError(f"solver {self.config.solver!r} takes two evaluations per step and timestep index "
                              f"{begin} is the second of a step; a pipeline can start only at a step's first "
                              f"(indices {starts}): change strength or num_inference_steps, or use a one-evaluation "
                              "solver (dpmpp_2m, unipc, ipndm)")

    def index_for_timestep(self, timestep: Any) -> int:
        """The index of `timestep` in `timesteps` (of two equal ones, the second: a step's start, as diffusers)."""
        t = torch.as_tensor(timestep, dtype=torch.float64).flatten()[0].item()
        matches = self._matches(t)
        if not matches:
            raise ConfigError(f"timestep {t:.6g} is not in this scheduler's timesteps; step() takes the timesteps "
                              "of the last set_timesteps call, in order")
        return matches[1] if len(matches) > 1 else matches[0]

    def _matches(self, t: float) -> list[int]:
        """The indices in `timesteps` equal to t (several: a two-stage solver's level, or rounded timesteps)."""
        scheduled = self.timesteps.double().cpu()
        return torch.nonzero((scheduled - t).abs() <= 1e-6 * max(1.0, abs(t))).flatten().tolist()

    def _sigma_at(self, t: float) -> float:
        """σ of timestep t: a scheduled one's state σ (of equal ones, the current step's if among them, as
        diffusers' add_noise), else log σ interpolated at t. The state's σ, not the model's: at AMED's a·s
        the pipeline's sample (which add_noise makes, as inpainting does between steps) is still at s."""
        matches = self._matches(t)
        if not matches:
            return float(self.t_to_sigma(torch.tensor(t)))
        current = self._step_index if self._step_index is not None else self._begin_index
        k = current if current in matches else (matches[1] if len(matches) > 1 else matches[0])
        return self._plan[k].sigma

    # ----- the steps --------------------------------------------------------------------------
    def _reset(self) -> None:
        self._step_index: int | None = None
        self._stepper: _Stepper | None = None
        self._scaled_first = False

    def _check_ready(self) -> None:
        if self.num_inference_steps is None:
            raise ConfigError("call set_timesteps(num_inference_steps) before stepping the scheduler")

    @staticmethod
    def _working_dtype(sample: Tensor) -> torch.dtype:
        return torch.float32 if sample.dtype in LOW_PRECISION else sample.dtype

    def _after_afs(self, stepper: _Stepper, sample: Tensor) -> Tensor:
        """The state at the first model evaluation when AFS answers the first one analytically, from the pure
        noise `sample` (VP scale) at the grid's first σ: D = x − σ0·x/sqrt(1 + σ0²) (`first_eps`)."""
        sigma0 = float(self._grid_sigmas[0])
        x = self._from_vp(sample.to(self._working_dtype(sample)), sigma0)
        return stepper.step(0, x, x - sigma0 * x / math.sqrt(1 + sigma0**2))

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The sample unchanged, except with AFS at the first evaluation: the initial noise moved by
        the analytical first step to the state the solver first evaluates."""
        self._check_ready()
        if not (self.config.afs and self._step_index is None):
            return sample
        self._scaled_first = True
        x = self._after_afs(self._make_stepper(), sample)
        return self._to_vp(x, self._plan[0].sigma_model).to(sample.dtype)

    @staticmethod
    def _to_vp(x: Tensor, sigma: float) -> Tensor:
        return vp_scale(sigma) * x                         # α·x (a float σ: α in float64, x keeps its dtype)

    @staticmethod
    def _from_vp(sample: Tensor, sigma: float) -> Tensor:
        return sample * math.sqrt(1 + sigma**2)

    def _start(self, timestep: Any) -> None:
        begin = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        self._check_begin(begin)
        if self.config.afs and not self._scaled_first:
            raise ConfigError("afs=True: the first evaluation is not at the initial noise, so the pipeline must "
                              "call scheduler.scale_model_input(sample, t) before the model (DDPMPipeline does "
                              "not); use afs=False with this pipeline")
        self._stepper, self._step_index = self._make_stepper(), begin

    def _denoised(self, model_output: Tensor, x: Tensor, sigma: float) -> Tensor:
        """D(x; σ) from the model's output at x (σ-space), by VPDenoiser's conversion (not its call, which would
        also find the timestep the output already answers: a third of the step's time at SD's latent size)."""
        return self._vp.denoised(x, sigma, model_output.to(x.dtype))

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, return_dict: bool = True,
             generator: torch.Generator | None = None, **kwargs: Any) -> SchedulerOutput | tuple[Tensor]:
        """Take the model's output at `sample` (VP scale, at timesteps[step_index]) and return the sample at
        the next timestep, or after the last one at the grid's last σ (VP scale, in sample's dtype)."""
        self._check_ready()
        if self._step_index is None:
            self._start(timestep)
        k = self._step_index
        if k >= len(self._plan):
            raise ConfigError(f"step() called more than num_inference_steps={self.num_inference_steps} times; "
                              "call set_timesteps again to start a new sample")
        evaluation, stepper_index = self._plan[k], k + int(self.config.afs)
        if self.config.afs and k == 0:
            x = self._after_afs(self._stepper, sample)
        else:
            x = self._from_vp(sample.to(self._working_dtype(sample)), evaluation.sigma_model)
        x_next = self._stepper.step(stepper_index, x, self._denoised(model_output, x, evaluation.sigma_model))
        self._step_index = k + 1
        sigma_next = self._plan[k + 1].sigma_model if k + 1 < len(self._plan) else float(self._grid_sigmas[-1])
        prev = self._to_vp(x_next, sigma_next).to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    # ----- noising (img2img, inpainting, training) --------------------------------------------
    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε (DDPM eq. 4) = (x0 + σ_t ε)/sqrt(1 + σ_t²); fractional t
        allowed; a scheduled timestep gives its grid σ (`_sigma_at`)."""
        ts = torch.as_tensor(timesteps, dtype=torch.float64).flatten().cpu()
        sigma = torch.tensor([self._sigma_at(t) for t in ts.tolist()], dtype=torch.float64) if self._plan else \
            self.t_to_sigma(ts)
        sigma = append_dims(sigma.to(original_samples.device), original_samples.ndim)
        noisy = vp_scale(sigma) * (original_samples.double() + sigma * noise.double())
        return noisy.to(original_samples.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def amed_scheduler_config(predictor: nn.Module, black_box: bool = False) -> dict[str, Any]:
    """The DifflabScheduler settings that run a fitted AMED predictor as per-step constants:
    solver "amed", its base solver, grid, ρ, σ range, AFS and amed_r / amed_c / amed_a (one value per
    step, the predictor evaluated with no feature, h = 0).

    A diffusers scheduler sees only the model's output, never the bottleneck feature from which an
    `AMEDPredictor` picks (r, c, a) per sample, so a predictor with a feature input is refused
    (ConfigError) unless `black_box=True` states it was fitted on a model without `last_feature`
    (its feature was always zero: the constants are then exact).
        scheduler = DifflabScheduler.from_config(pipe.scheduler.config, **amed_scheduler_config(predictor, True))
    """
    if hasattr(predictor, "feature_in") and not black_box:
        raise ConfigError("this AMED predictor chooses (r, c, a) per sample from the denoiser's bottleneck feature, "
                          "which a diffusers scheduler never sees; DifflabScheduler can run per-step constants only, "
                          "and exporting them would drop the per-sample part. Sample with difflab.amed.amed_sample on "
                          "the model loaded by difflab.load, or, if the predictor was fitted on a black-box model "
                          "(no last_feature, so its feature input was always zero), pass black_box=True")
    fitted = predictor.fitted_for
    sigmas = predictor_sigmas(predictor)
    with torch.no_grad():
        params = predictor(None, sigmas[:-1].float(), sigmas[1:].float())
    return {"solver": "amed", "amed_base": check_base(fitted.get("base_solver") or "dpm2"), "grid": fitted["grid"],
            "rho": fitted.get("rho", 7.0), "sigma_min": fitted["sigma_min"], "sigma_max": fitted["sigma_max"],
            "afs": fitted.get("afs", True), "amed_r": params.r.tolist(), "amed_c": params.c.tolist(),
            "amed_a": params.a.tolist(), "grid_sigmas": fitted.get("sigmas")}


__all__ = ["DifflabScheduler", "Evaluation", "alphas_cumprod_for", "amed_scheduler_config", "make_stepper"]
