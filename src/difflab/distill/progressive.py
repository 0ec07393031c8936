"""Stage 2 of guided distillation: progressive halving of the step count (Salimans & Ho 2022, Alg. 2;
Meng et al. 2023, §4.2), in σ-space, where a DDIM step is an Euler step (`ddim_step`).

One round: the teacher takes 2N steps, the student N, on the cosine grid σ(u) (`schedule`). Draw
x, c, w, ε and i ~ U{1..N}; t = i/N, t' = t − 0.5/N, t'' = t − 1/N; x_t = x + σ_t·ε. Two teacher
DDIM steps give x_t'' and the target x̃ is the x̂ for which ONE student DDIM step t → t'' lands
there:

    x_t'' = x̃ + (σ''/σ)(x_t − x̃)   ⇒   x̃ = (x_t'' − (σ''/σ)·x_t) / (1 − σ''/σ)

(the σ-space form of the paper's x̃ = (z'' − (σ''_vp/σ_vp)z)/(α'' − (σ''_vp/σ_vp)α): divide its
numerator and denominator by α''). At t'' = 0 the ratio is 0 and x̃ = x_t'' = x̂_teacher(x_t'),
the paper's final-step case, with no special branch. Loss max(SNR_t, 1)·‖x̂_η(x_t) − x̃‖²; targets
in float32 without clipping; then teacher ← student, N ← N/2, with a fresh optimiser (the learning
rate schedule restarts) and no EMA, and a student folder written per round.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from difflab.core.denoiser import append_dims, sigma_batch
from difflab.core.errors import AddonMismatchError, ConfigError
from difflab.train.loop import TrainConfig, fit
from difflab.distill.guided import BatchFn, check_w_range, guidance_weights
from difflab.distill.samplers import ddim_step
from difflab.distill.schedule import cosine_sigma, truncated_snr_weight
from difflab.distill.student import clone_model, load_student


def two_step_target(x_t: Tensor, x_t2: Tensor, sigma: Tensor | float, sigma_2: Tensor | float) -> Tensor:
    """x̃ = (x_t'' − (σ''/σ)·x_t)/(1 − σ''/σ): one DDIM step σ → σ'' from x_t with x̂ = x̃ lands on x_t''.

    x_t, x_t2: [B, ...] at σ and σ''; sigma, sigma_2: floats or [B], 0 <= σ'' < σ.
    """
    ratio = append_dims(sigma_batch(sigma_2, x_t) / sigma_batch(sigma, x_t), x_t.ndim)
    return (x_t2 - ratio * x_t) / (1 - ratio)


def teacher_two_steps(teacher: Callable[..., Tensor], x_t: Tensor, sigma: Tensor, sigma_1: Tensor,
                      sigma_2: Tensor, **cond: Any) -> Tensor:
    """Two teacher DDIM steps σ → σ' → σ'' (each [B]) from x_t: [B, ...]; returns x_t''."""
    x_t1 = ddim_step(x_t, teacher(x_t, sigma, **cond), sigma, sigma_1)
    return ddim_step(x_t1, teacher(x_t1, sigma_1, **cond), sigma_1, sigma_2)


def progressive_target(teacher: Callable[..., Tensor], x_t: Tensor, sigma: Tensor, sigma_1: Tensor,
                       sigma_2: Tensor, **cond: Any) -> Tensor:
    """The distillation target x̃ for x_t at σ (METHODS.md §4), in float32, without gradients or clipping."""
    device_type = x_t.device.type
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        x_t, sigma, sigma_1, sigma_2 = x_t.float(), sigma.float(), sigma_1.float(), sigma_2.float()
        cond = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
        x_t2 = teacher_two_steps(teacher, x_t, sigma, sigma_1, sigma_2, **cond)
        return two_step_target(x_t, x_t2, sigma, sigma_2)


def progressive_loss(teacher: Callable[..., Tensor], student_steps: int, batch_fn: BatchFn, batch_size: int,
                     sigma_max: float, w_range: tuple[float, float] | None = (0.0, 4.0)):
    """loss_fn(student, generator, step, micro) for `fit`: one round with a teacher of 2N steps, student N.

    w_range: guidance weights drawn per sample (passed as `w=`); None for a model without w.
    """
    n = int(student_steps)
    w_range = None if w_range is None else check_w_range(w_range)

    def loss_fn(student: nn.Module, generator: torch.Generator, step: int = 0, micro: int = 0) -> Tensor:
        x0, cond = batch_fn(generator, batch_size)
        device = x0.device
        i = torch.randint(1, n + 1, (batch_size,), generator=generator, device=generator.device).double().cpu()
        sigma, sigma_1, sigma_2 = (cosine_sigma(u, sigma_max).float().to(device)              # t, t', t''
                                   for u in (i / n, (i - 0.5) / n, (i - 1) / n))
        if w_range is not None:
            cond = {**cond, "w": guidance_weights(batch_size, generator, w_range, device)}
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(device)
        x_t = x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * noise
        target = progressive_target(teacher, x_t, sigma, sigma_1, sigma_2, **cond)
        x0_hat = student(x_t, sigma.to(x0.dtype), **cond)
        weight = append_dims(truncated_snr_weight(sigma), x0.ndim)                            # max(SNR, 1)
        return (weight * (x0_hat - target.to(x0_hat.dtype)).square()).mean()

    return loss_fn


def check_halving(n_from: int, n_to: int) -> list[int]:
    """The students' step counts n_from/2, n_from/4, …, n_to; both powers of two, n_to < n_from."""
    for name, value in (("--from", n_from), ("--to", n_to)):
        if int(value) != value or value < 1 or (int(value) & (int(value) - 1)):
            raise ConfigError(f"{name} must be a power of two >= 1, got {value}")
    if n_to >= n_from:
        raise ConfigError(f"need --to < --from (each round halves the steps), got from {n_from} to {n_to}")
    return [n_from >> k for k in range(1, int(math.log2(n_from // n_to)) + 1)]


def freeze_copy(model: nn.Module) -> nn.Module:
    """A frozen copy (eval, no gradients): the next round's teacher."""
    return clone_model(model).eval().requires_grad_(False)


def distill_progressive(student: nn.Module, batch_fn: BatchFn, n_from: int = 256, n_to: int = 1,
                        config: TrainConfig | None = None, batch_size: int = 128,
                        w_range: tuple[float, float] | None = (0.0, 4.0), sigma_max: float | None = None,
                        rounds_dir: str | Path | None = None, teacher: Callable[..., Tensor] | None = None,
                        progress: bool = True, resume: bool = True,
                        on_round: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """Progressive distillation from n_from teacher steps down to an n_to-step student.

    student: the model to distil (a GuidedStudent from stage 1); round 1's teacher is a frozen copy
    of it unless `teacher` is given (any σ-space denoiser taking the same cond, e.g. an exact
    CFGDenoiser). config: per round (a fresh optimiser and warm-up each round; EMA is switched off).
    rounds_dir: each round's student is saved to rounds_dir/steps-NNNN (a GuidedStudent folder, which
    `difflab.load` reads) and its fit checkpoints to rounds_dir/steps-NNNN.checkpoints; with resume,
    finished rounds are loaded instead of retrained (refused, AddonMismatchError, when they were
    distilled from another starting model). on_round(n, student) runs after each round.
    Returns the n_to-step student (train mode).
    """
    config = dataclasses.replace(config or TrainConfig(), ema_decay=0.0)   # "no EMA" (Meng et al.)
    sigma_max = sigma_max or getattr(student, "grid_sigma_max", None) or getattr(student, "sigma_max", None)
    if not sigma_max or sigma_max == float("inf"):
        raise ConfigError("progressive distillation needs the grid's sigma_max (the student has none)")
    sigma_min = getattr(student, "sigma_min", None) or 0.0
    finest = float(cosine_sigma(0.5 / (n_from // 2), sigma_max))       # the teacher's smallest positive σ
    if finest < sigma_min * (1 - 1e-6):
        raise ConfigError(f"a {n_from}-step teacher grid reaches sigma {finest:.3g}, below the model's sigma_min "
                          f"{sigma_min:.3g}; start from fewer steps")
    origin = _fingerprint(student) if rounds_dir is not None else None
    student = student.train().requires_grad_(True)
    for n in check_halving(n_from, n_to):
        folder = None if rounds_dir is None else Path(rounds_dir) / f"steps-{n:04d}"
        if resume and folder is not None and (folder / "config.json").is_file():
            student, teacher = _finished_round(folder, origin, next(student.parameters()).device), None
        else:
            round_teacher = teacher if teacher is not None else freeze_copy(student)
            teacher = None
            loss_fn = progressive_loss(round_teacher, n, batch_fn, batch_size, sigma_max, w_range)
            checkpoints = None if folder is None else folder.with_name(folder.name + ".checkpoints")
            round_config = dataclasses.replace(config, seed=config.seed + n)    # fresh draws each round
            result = fit(student, loss_fn, round_config, out_dir=checkpoints, resume=resume, progress=progress,
                         description=f"stage 2: {2 * n} → {n} steps")
            student = result.model
            if hasattr(student, "distilled"):
                student.distilled.update({"stage": "progressive", "steps": n, "grid_sigma_max": sigma_max,
                                          "teacher": origin})
            if folder is not None and result.is_main_process:
                student.save(folder, overwrite=True)
        if on_round is not None:
            on_round(n, student)
    return student


def _fingerprint(model: nn.Module) -> str | None:
    from difflab.core.fingerprint import fingerprint
    return fingerprint(model)


def _finished_round(folder: Path, origin: str | None, device: torch.device) -> nn.Module:
    """A round's saved student, checked to descend from the same starting model; train mode, on `device`."""
    student = load_student(folder, device)
    if origin is not None and student.distilled.get("teacher") != origin:
        raise AddonMismatchError(f"{folder} was distilled from another starting model "
                                 f"({str(student.distilled.get('teacher'))[:12]}…, not {origin[:12]}…); delete "
                                 "the rounds folder or run without resume (CLI: --no-resume)")
    return student.train().requires_grad_(True)


__all__ = ["two_step_target", "teacher_two_steps", "progressive_target", "progressive_loss", "check_halving",
           "freeze_copy", "distill_progressive"]
