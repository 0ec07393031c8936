"""Fitting an AMED predictor (Zhou et al., CVPR 2024; docs/methods/amed.md (10)–(11)) on the shared loop.

For each batch of trajectories: x_T = σ_max·z; a teacher (Heun) integrates, without gradients, the
same grid family with (M+1)(N−1)+1 points, and every (M+1)-th state is kept, so the teacher lands
exactly on the student's N points. Then for each of the N−1 intervals in turn: one student step
(AMED-Solver, or AMED-Plugin on a base solver), loss Σ‖x_student − x_teacher(t_{i+1})‖² (mean over
the batch), one Adam step. One-step students (dpm2 = AMED-Solver, euler) start each interval from
the teacher's state at t_i (teacher forcing); multistep ones (ipndm, dpmpp_2m/3m, unipc) continue
from their own previous state and history (continuation), cut from the graph between intervals.
The denoiser is frozen; gradients reach r (and a) through its input.

Mapping onto `difflab.train.loop.fit`: one fit step = one interval of one batch, so
train_steps = batches × (N−1); step k (which `fit` passes to the loss) trains interval k mod (N−1) of
batch k // (N−1). The batch's noise (and conditioning) come from a generator that is a pure
function of (seed, batch, rank, micro-batch).
The teacher trajectory is cached for the batch's N−1 steps and regenerated on a resume that lands
mid-batch, so a resumed fit equals an uninterrupted one; with a continuation student, checkpoints
are kept at batch boundaries (checkpoint_every rounded up to a multiple of N−1), where the
student's state starts afresh, so that holds there too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from difflab.amed.plugin import ONE_STEP_BASES, PLUGIN_BASES, PluginState, check_base, plugin_interval
from difflab.amed.predictor import AMEDPredictor, amed_points, amed_step
from difflab.core.errors import ConfigError
from difflab.core.fingerprint import fingerprint
from difflab.sampling.grids import get_sigmas
from difflab.sampling.registry import SOLVERS
from difflab.train.contract import FitResult, StepCallback
from difflab.train.loop import TrainConfig, fit, make_accelerator

CondSampler = Callable[[torch.Generator, int], dict[str, Any]]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class AMEDConfig(TrainConfig):
    """An AMED fit: the loop's settings with AMED's defaults (Adam lr 5e−3, no warm-up, no clipping, no
    EMA, full precision: the predictor is tiny) plus the method's own.

    nfe: evaluations to fit for (AFS: 3, 5, 7, 9 ↔ N = 3, 4, 5, 6 grid points); grid, rho: the grid
    family; sigma_min/max: default the denoiser's range (0.002 / 80 when it has none or an infinite
    one); teacher_solver: a registered deterministic solver run on (M+1)(N−1)+1 points; trajectories,
    batch_size: teacher trajectories in all and per batch; base_solver: "dpm2" (AMED-Solver) or the
    AMED-Plugin base (euler, ipndm, dpmpp_2m, dpmpp_3m, unipc); delta_c, delta_a: the ranges of c and
    a; dtype: of the trajectories ("float32" or "float64"). train_steps 0 (the default): derived,
    ceil(trajectories / batch_size)·(N−1); a positive value is used as given (batches continue).
    """

    train_steps: int = 0
    lr: float = 5e-3
    warmup_steps: int = 0
    ema_decay: float = 0.0
    grad_clip: float = 0.0
    mixed_precision: str = "no"
    checkpoint_every: int = 1000
    log_every: int = 10
    nfe: int = 5
    grid: str = "karras"
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    teacher_solver: str = "heun"
    M: int = 1
    trajectories: int = 10_000
    batch_size: int = 128
    afs: bool = True
    delta_c: float = 0.01
    delta_a: float = 0.0
    base_solver: str = "dpm2"
    dtype: str = "float32"

    def validate(self) -> None:
        if self.teacher_solver not in SOLVERS or SOLVERS[self.teacher_solver].stochastic:
            raise ConfigError(f"teacher_solver must be a deterministic registered solver, got {self.teacher_solver!r}")
        check_base(self.base_solver)
        if self.M < 0 or self.trajectories < 1 or self.batch_size < 1 or self.train_steps < 0:
            raise ConfigError(f"need M >= 0, trajectories >= 1, batch_size >= 1, train_steps >= 0; got {self.M}, "
                              f"{self.trajectories}, {self.batch_size}, {self.train_steps}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        amed_points(self.nfe, self.afs)    # ConfigError for an NFE AMED cannot spend
        TrainConfig.validate(dataclasses.replace(self, train_steps=self.train_steps or 1))   # 0: derived

    def resolved(self, n_steps: int, device: str) -> "AMEDConfig":
        """This config as the fit runs it, on a grid of n_steps intervals: train_steps derived (where 0),
        checkpoints at batch boundaries for a continuation student, the device resolved."""
        train_steps = self.train_steps or math.ceil(self.trajectories / self.batch_size) * n_steps
        checkpoint_every = self.checkpoint_every
        if self.base_solver not in ONE_STEP_BASES:   # batch boundaries: the student's own state starts afresh
            checkpoint_every = math.ceil(checkpoint_every / n_steps) * n_steps
        return dataclasses.replace(self, train_steps=train_steps, checkpoint_every=checkpoint_every, device=device)


def batch_generator(seed: int, batch: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """The RNG of one batch of trajectories: a pure function of (seed, batch, rank, micro)."""
    digest = hashlib.blake2b(f"amed/{seed}/{batch}/{rank}/{micro}".encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") >> 1)


@torch.no_grad()
def teacher_trajectory(denoiser, x_start: Tensor, teacher_sigmas: Tensor, every: int, teacher: str = "heun",
                       **cond: Any) -> list[Tensor]:
    """The teacher's states on the student grid: [x at teacher_sigmas[0], then every `every`-th state]."""
    states = [x_start]

    def keep(i: int, x: Tensor, sigma_next: float) -> None:
        if (i + 1) % every == 0:
            states.append(x)

    SOLVERS[teacher].fn(denoiser, x_start, teacher_sigmas, callback=keep, **cond)
    return states


def fit_amed(denoiser, config: AMEDConfig = AMEDConfig(), *, cond_sampler: CondSampler | None = None,
             shape: tuple[int, ...] | None = None, out_dir: str | Path | None = None,
             callback: StepCallback | None = None, progress: bool = False,
             resume: bool = True) -> FitResult[AMEDPredictor]:
    """Fit g_φ for AMED-Solver (config.base_solver "dpm2") or AMED-Plugin on another base solver, for
    `denoiser` at config.nfe evaluations (see `AMEDConfig` for every setting).

    shape: the per-sample data shape (default denoiser.data_shape); cond_sampler(generator, batch_size)
    -> cond kwargs (e.g. class labels, drawn on generator.device) for a conditional model.
    The fit runs on the denoiser's device (config.device "auto"); an explicit other device is an
    error. The denoiser's parameters are frozen during the fit (requires_grad is restored after).
    Returns a FitResult: model = the fitted predictor (eval mode, frozen; the resolved config under
    "fit" in its config.json), timings "total" and "teacher" (the reference trajectories). With
    out_dir, checkpoints go to out_dir and the predictor to out_dir/predictor.
    """
    config.validate()
    start = time.perf_counter()
    sigma_min = _default(config.sigma_min, getattr(denoiser, "sigma_min", None), 0.002)
    sigma_max = _default(config.sigma_max, getattr(denoiser, "sigma_max", None), 80.0)
    shape = tuple(shape or getattr(denoiser, "data_shape", None) or ())
    if not shape:
        raise ConfigError("pass shape= (the per-sample data shape); the denoiser does not declare data_shape")
    n_points = amed_points(config.nfe, config.afs)
    n_steps = n_points - 1
    sigmas = get_sigmas(config.grid, n_points, sigma_min, sigma_max, config.rho)
    teacher_sigmas = get_sigmas(config.grid, (config.M + 1) * n_steps + 1, sigma_min, sigma_max, config.rho)
    model_device = _device_of(denoiser)
    device_name = config.device
    if device_name == "auto" and model_device is not None and model_device.type in ("cpu", "cuda"):
        device_name = model_device.type   # fit where the model lives
    config = config.resolved(n_steps, device_name)
    accelerator = make_accelerator(config)
    device = accelerator.device
    if model_device is not None and model_device.type != device.type:
        raise ConfigError(f"the denoiser is on {model_device} but the fit runs on {device} (config.device="
                          f"{config.device!r}); move the denoiser there first (denoiser.to({str(device)!r}))")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)   # the predictor's initial weights depend only on the seed
        predictor = AMEDPredictor(delta_c=config.delta_c, delta_a=config.delta_a, base_model=fingerprint(denoiser),
                                  nfe=config.nfe, grid=config.grid, rho=config.rho, sigma_min=sigma_min,
                                  sigma_max=sigma_max, afs=config.afs, base_solver=check_base(config.base_solver),
                                  teacher=config.teacher_solver, M=config.M)

    teacher_seconds = [0.0]
    cache: dict[tuple[int, int], tuple[list[Tensor], dict]] = {}

    def batch(index: int, micro: int) -> tuple[list[Tensor], dict]:
        if (index, micro) not in cache:
            cache.clear()
            tic = time.perf_counter()
            generator = batch_generator(config.seed, index, accelerator.process_index, micro, device)
            z = torch.randn((config.batch_size, *shape), generator=generator, device=device,
                            dtype=DTYPES[config.dtype])
            cond = cond_sampler(generator, config.batch_size) if cond_sampler else {}
            states = teacher_trajectory(denoiser, sigma_max * z, teacher_sigmas, config.M + 1,
                                        config.teacher_solver, **cond)
            cache[(index, micro)] = (states, cond)
            teacher_seconds[0] += time.perf_counter() - tic
        return cache[(index, micro)]

    student_step = _student_step(denoiser, sigmas, config.base_solver, config.afs, n_steps)

    def loss_fn(model: nn.Module, generator: torch.Generator, step: int, micro: int) -> Tensor:
        index, i = divmod(step, n_steps)                 # batch index, interval index
        states, cond = batch(index, micro)
        x_student = student_step(model, states, i, micro, cond)
        return (x_student - states[i + 1]).square().flatten(1).sum(1).mean()

    frozen = [(p, p.requires_grad) for p in denoiser.parameters()] if isinstance(denoiser, nn.Module) else []
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        result = fit(predictor, loss_fn, config, out_dir=out_dir, callback=callback, resume=resume, progress=progress,
                     description=f"fitting AMED {config.base_solver} (NFE {config.nfe})", accelerator=accelerator,
                     run={"shape": list(shape)})
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    fitted = result.model.eval().requires_grad_(False)
    fitted.fitted_for["fit"] = config.to_dict()
    if out_dir is not None and result.is_main_process:
        fitted.save(Path(out_dir) / "predictor", overwrite=True)
    timings = {"total": time.perf_counter() - start, "teacher": teacher_seconds[0]}
    return dataclasses.replace(result, model=fitted, timings=timings)


def _student_step(denoiser, sigmas: Tensor, base_solver: str, afs: bool, n_steps: int):
    """student_step(model, teacher states, interval i, micro-batch, cond) -> the student's x at t_{i+1}.

    One-step students (dpm2 = AMED-Solver, euler) start from the teacher's state at t_i (teacher
    forcing); multistep ones continue from their own previous state, cut from the graph between intervals.
    """
    continuation = base_solver not in ONE_STEP_BASES
    students: dict[int, PluginState] = {}              # micro-batch -> the continuation student's state

    def student_step(model: nn.Module, states: list[Tensor], i: int, micro: int, cond: dict) -> Tensor:
        t_cur, t_next, first = float(sigmas[i]), float(sigmas[i + 1]), afs and i == 0
        if base_solver == "dpm2":                        # AMED-Solver, teacher forcing
            return amed_step(denoiser, states[i], t_cur, t_next, model, analytic_first=first, **cond)[0]
        if not continuation or i == 0 or micro not in students:
            # teacher forcing (or the first interval; or a resume that landed mid-batch, where the
            # student restarts from the teacher's state)
            students[micro] = PluginState(states[i], substep=2 * i)
        state, _ = plugin_interval(denoiser, model, PLUGIN_BASES[base_solver], students[micro], t_cur, t_next,
                                   2 * n_steps, analytic_first=first, **cond)
        students[micro] = state.detach()
        return state.x

    return student_step


def _device_of(denoiser) -> torch.device | None:
    if not isinstance(denoiser, nn.Module):
        return None
    tensor = next(iter(denoiser.parameters()), None)
    tensor = tensor if tensor is not None else next(iter(denoiser.buffers()), None)
    return None if tensor is None else tensor.device


def _default(value: float | None, from_model: float | None, fallback: float) -> float:
    if value is not None:
        return float(value)
    if from_model is None or not 0 < from_model < math.inf:
        return fallback
    return float(from_model)


__all__ = ["AMEDConfig", "fit_amed", "teacher_trajectory", "batch_generator"]
