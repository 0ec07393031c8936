"""Fitting an AMED predictor (Zhou et al., CVPR 2024; METHODS.md §1, "Training") on the shared loop.

For each batch of trajectories: x_T = σ_max·z; a teacher (Heun) integrates, without gradients, the
same grid family with (M+1)(N−1)+1 points, and every (M+1)-th state is kept, so the teacher lands
exactly on the student's N points. Then for each of the N−1 intervals in turn: one student step
(AMED-Solver, or AMED-Plugin on a base solver), loss Σ‖x_student − x_teacher(t_{i+1})‖² (mean over
the batch), one Adam step. One-step students (dpm2 = AMED-Solver, euler) start each interval from
the teacher's state at t_i (teacher forcing); multistep ones (ipndm, dpmpp_2m/3m, unipc) continue
from their own previous state and history (continuation), cut from the graph between intervals.
The denoiser is frozen; gradients reach r (and a) through its input.

Mapping onto `difflab.train.loop.fit`: one fit step = one interval of one batch, so
steps = batches × (N−1); step k (which `fit` passes to the loss) trains interval k mod (N−1) of
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
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from difflab.core.errors import ConfigError
from difflab.amed.predictor import AMEDPredictor, amed_points, amed_step
from difflab.core.fingerprint import fingerprint
from difflab.sampling.grids import get_sigmas
from difflab.amed.plugin import ONE_STEP_BASES, PLUGIN_BASES, PluginState, check_base, plugin_interval
from difflab.sampling.registry import SOLVERS
from difflab.train.loop import TrainConfig, TrainResult, fit, make_accelerator

CondSampler = Callable[[torch.Generator, int], dict[str, Any]]


def default_config(**overrides) -> TrainConfig:
    """AMED's defaults on the shared loop: Adam lr 5e−3, no warm-up, no clipping, no EMA (decay 0:
    the 'EMA' is the model itself), full precision (the predictor is tiny)."""
    return dataclasses.replace(TrainConfig(lr=5e-3, warmup_steps=0, grad_clip=0.0, ema_decay=0.0,
                                           mixed_precision="no", checkpoint_every=1000, log_every=10), **overrides)


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


def fit_amed(denoiser, nfe: int, grid: str = "karras", sigma_min: float | None = None,
             sigma_max: float | None = None, teacher: str = "heun", M: int = 1, trajectories: int = 10_000,
             batch_size: int = 128, config: TrainConfig | None = None, out_dir: str | Path | None = None,
             shape: tuple[int, ...] | None = None, cond_sampler: CondSampler | None = None, afs: bool = True,
             delta_c: float = 0.01, delta_a: float = 0.0, rho: float = 7.0, dtype: torch.dtype = torch.float32,
             base_solver: str = "dpm2",
             resume: bool = True, progress: bool = False,
             return_result: bool = False) -> AMEDPredictor | tuple[AMEDPredictor, TrainResult]:
    """Fit g_φ for AMED-Solver (base_solver "dpm2") or AMED-Plugin on `base_solver` (euler, ipndm,
    dpmpp_2m, dpmpp_3m, unipc) on `denoiser` at `nfe` evaluations (AFS: NFE 3,5,7,9 ↔ N = 3,4,5,6).

    sigma_min/max: default the denoiser's range (0.002 / 80 when it has none or an infinite one);
    teacher: a registered deterministic solver run on (M+1)(N−1)+1 points; shape: the per-sample
    data shape (default denoiser.data_shape); cond_sampler(generator, batch_size) -> cond kwargs
    (e.g. class labels, drawn on generator.device) for a conditional model. config: the loop's settings (default
    `default_config()`); its `steps` is replaced by ceil(trajectories/batch_size)·(N−1).
    The fit runs on the denoiser's device (config.device "auto"); an explicit other device is an
    error. The denoiser's parameters are frozen during the fit (requires_grad is restored after).
    Returns the fitted predictor (eval mode, frozen), or (predictor, the loop's TrainResult) with
    return_result=True. With out_dir, checkpoints go to out_dir and the predictor to out_dir/predictor.
    """
    if teacher not in SOLVERS or SOLVERS[teacher].stochastic:
        raise ConfigError(f"teacher must be a deterministic registered solver, got {teacher!r}")
    base_solver = check_base(base_solver)
    if M < 0 or trajectories < 1 or batch_size < 1:
        raise ConfigError(f"need M >= 0, trajectories >= 1, batch_size >= 1; got {M}, {trajectories}, {batch_size}")
    sigma_min = _default(sigma_min, getattr(denoiser, "sigma_min", None), 0.002)
    sigma_max = _default(sigma_max, getattr(denoiser, "sigma_max", None), 80.0)
    shape = tuple(shape or getattr(denoiser, "data_shape", None) or ())
    if not shape:
        raise ConfigError("pass shape= (the per-sample data shape); the denoiser does not declare data_shape")
    n_points = amed_points(nfe, afs)
    n_steps = n_points - 1
    sigmas = get_sigmas(grid, n_points, sigma_min, sigma_max, rho)
    teacher_sigmas = get_sigmas(grid, (M + 1) * n_steps + 1, sigma_min, sigma_max, rho)
    config = dataclasses.replace(config or default_config(),
                                 steps=math.ceil(trajectories / batch_size) * n_steps)
    continuation = base_solver not in ONE_STEP_BASES
    if continuation:   # checkpoints at batch boundaries, where the student's own state starts afresh
        config = dataclasses.replace(config, checkpoint_every=math.ceil(config.checkpoint_every / n_steps) * n_steps)
    model_device = _device_of(denoiser)
    if config.device == "auto" and model_device is not None and model_device.type in ("cpu", "cuda"):
        config = dataclasses.replace(config, device=model_device.type)   # fit where the model lives
    accelerator = make_accelerator(config)
    device = accelerator.device
    if model_device is not None and model_device.type != device.type:
        raise ConfigError(f"the denoiser is on {model_device} but the fit runs on {device} (config.device="
                          f"{config.device!r}); move the denoiser there first (denoiser.to({str(device)!r}))")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)   # the predictor's initial weights depend only on the seed
        predictor = AMEDPredictor(delta_c=delta_c, delta_a=delta_a, base_model=fingerprint(denoiser), nfe=nfe,
                                  grid=grid, rho=rho, sigma_min=sigma_min, sigma_max=sigma_max, afs=afs,
                                  base_solver=base_solver, teacher=teacher, M=M)

    cache: dict[tuple[int, int], tuple[list[Tensor], dict]] = {}

    def batch(index: int, micro: int) -> tuple[list[Tensor], dict]:
        if (index, micro) not in cache:
            cache.clear()
            generator = batch_generator(config.seed, index, accelerator.process_index, micro, device)
            z = torch.randn((batch_size, *shape), generator=generator, device=device, dtype=dtype)
            cond = cond_sampler(generator, batch_size) if cond_sampler else {}
            states = teacher_trajectory(denoiser, sigma_max * z, teacher_sigmas, M + 1, teacher, **cond)
            cache[(index, micro)] = (states, cond)
        return cache[(index, micro)]

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

    def loss_fn(model: nn.Module, generator: torch.Generator, step: int, micro: int) -> Tensor:
        index, i = divmod(step, n_steps)                 # batch index, interval index
        states, cond = batch(index, micro)
        x_student = student_step(model, states, i, micro, cond)
        return (x_student - states[i + 1]).square().flatten(1).sum(1).mean()

    frozen = [(p, p.requires_grad) for p in denoiser.parameters()] if isinstance(denoiser, nn.Module) else []
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        result = fit(predictor, loss_fn, config, out_dir=out_dir, resume=resume, progress=progress,
                     description=f"fitting AMED {base_solver} (NFE {nfe})", accelerator=accelerator)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    fitted = result.model.eval().requires_grad_(False)
    if out_dir is not None and result.is_main_process:
        fitted.save(Path(out_dir) / "predictor", overwrite=True)
    return (fitted, result) if return_result else fitted


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


__all__ = ["fit_amed", "default_config", "teacher_trajectory", "batch_generator"]
