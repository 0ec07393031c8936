"""Stage 2 of guided distillation: progressive halving of the step count (Salimans & Ho 2022, Alg. 2;
Meng et al. 2023, §3.2), in σ-space, where a DDIM step is an Euler step (`ddim_step`).

One round: the teacher takes 2N steps, the student N, on the cosine grid σ(u) (`schedule`). Draw
x, c, w, ε and i ~ U{1..N}; t = i/N, t' = t − 0.5/N, t'' = t − 1/N; x_t = x + σ_t·ε. Two teacher
DDIM steps give x_t'' and the target x̃ is the x̂ for which ONE student DDIM step t → t'' lands
there:

    x_t'' = x̃ + (σ''/σ)(x_t − x̃)   ⇒   x̃ = (x_t'' − (σ''/σ)·x_t) / (1 − σ''/σ)

(the σ-space form of the paper's x̃ = (z'' − (σ''_vp/σ_vp)z)/(α'' − (σ''_vp/σ_vp)α): divide its
numerator and denominator by α''). At t'' = 0 the ratio is 0 and x̃ = x_t'' = x̂_teacher(x_t'),
the paper's final-step case, with no special branch. Loss max(SNR_t, 1)·‖x̂_η(x_t) − x̃‖²; targets
in float32 without clipping; then teacher ← student, N ← N/2, with a fresh optimiser (the learning
rate schedule restarts) and no EMA, and a student folder written per round. The hyper-parameters
are one `ProgressiveDistillConfig`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from difflab.core.denoiser import append_dims, sigma_batch
from difflab.core.errors import AddonMismatchError, ConfigError
from difflab.distill.guided import BatchFn, check_w_range, guidance_weights
from difflab.distill.samplers import ddim_step
from difflab.distill.schedule import cosine_sigma, truncated_snr_weight
from difflab.distill.student import GuidedStudent, clone_model, load_student
from difflab.train.contract import FitResult, StepCallback
from difflab.train.loop import TrainConfig, fit


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
    """The distillation target x̃ for x_t at σ (docs/methods/distillation.md (8)), in float32, without gradients
    or clipping."""
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


def check_halving(from_steps: int, to_steps: int) -> list[int]:
    """The students' step counts from_steps/2, from_steps/4, …, to_steps; both powers of two, to_steps < from_steps."""
    for name, value in (("from_steps (--from-steps)", from_steps), ("to_steps (--to-steps)", to_steps)):
        if int(value) != value or value < 1 or (int(value) & (int(value) - 1)):
            raise ConfigError(f"{name} must be a power of two >= 1, got {value}")
    if to_steps >= from_steps:
        raise ConfigError(f"need to_steps < from_steps (--to-steps < --from-steps: each round halves the steps), "
                          f"got from {from_steps} to {to_steps}")
    return [from_steps >> k for k in range(1, int(math.log2(from_steps // to_steps)) + 1)]


def freeze_copy(model: nn.Module) -> nn.Module:
    """A frozen copy (eval, no gradients): the next round's teacher."""
    return clone_model(model).eval().requires_grad_(False)


@dataclass
class ProgressiveDistillConfig(TrainConfig):
    """Stage 2's hyper-parameters: the loop's (`TrainConfig`, applied to every round) plus the halving
    schedule from_steps → to_steps, the optimiser steps per round, the batch per process and the range
    w ~ U[w_range] of guidance weights (None: a model without w). Round-trips through JSON; saved in
    each round's student.

    train_steps is derived, not set: the total over all rounds, len(rounds()) × train_steps_per_round.
    Steps count across rounds: optimiser step s (1-based, as in `Step.step` and the history) belongs to
    the round whose student takes `student_steps_at(s)` steps.
    Defaults follow Meng et al.: no EMA (ema_decay = 0) and a small learning rate, restarted each round.
    """

    train_steps: int = field(default=0, init=False)
    lr: float = 1e-4
    ema_decay: float = 0.0
    from_steps: int = 256
    to_steps: int = 1
    train_steps_per_round: int = 1000
    batch_size: int = 128
    w_range: tuple[float, float] | None = (0.0, 4.0)

    def __post_init__(self) -> None:
        self.train_steps = len(self.rounds()) * self.train_steps_per_round
        getattr(super(), "__post_init__", lambda: None)()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ProgressiveDistillConfig":
        """As JSONConfig.from_dict; a train_steps entry (as to_dict writes it) must equal the derived total."""
        values = dict(values)
        total = values.pop("train_steps", None)
        config = super().from_dict(values)
        if total is not None and total != config.train_steps:
            raise ConfigError(f"train_steps is the total over the rounds ({len(config.rounds())} × "
                              f"train_steps_per_round {config.train_steps_per_round} = {config.train_steps}), "
                              f"got {total}; set train_steps_per_round instead")
        return config

    def rounds(self) -> list[int]:
        """The students' step counts, one per round: from_steps/2, from_steps/4, …, to_steps."""
        return check_halving(self.from_steps, self.to_steps)

    def student_steps_at(self, step: int) -> int:
        """The student step count of the round that optimiser step `step` (1-based, across rounds) trains."""
        return self.rounds()[(step - 1) // self.train_steps_per_round]

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 1 or self.train_steps_per_round < 1:
            raise ConfigError(f"batch_size and train_steps_per_round must be >= 1, got {self.batch_size} and "
                              f"{self.train_steps_per_round}")
        if self.w_range is not None:
            check_w_range(self.w_range)


def distill_progressive(student: nn.Module, batches: BatchFn,
                        config: ProgressiveDistillConfig = ProgressiveDistillConfig(), *,
                        teacher: Callable[..., Tensor] | None = None, out_dir: str | Path | None = None,
                        callback: StepCallback | None = None, progress: bool = True,
                        resume: bool = True) -> FitResult[GuidedStudent]:
    """Progressive distillation from config.from_steps teacher steps down to a config.to_steps-step student.

    student: the model to distil (a GuidedStudent from stage 1); round 1's teacher is a frozen copy
    of it unless `teacher` is given (any σ-space denoiser taking the same cond, e.g. an exact
    CFGDenoiser). Each round gets a fresh optimiser and warm-up and the seed config.seed + N.
    out_dir: each round's student is saved to out_dir/steps-NNNN (a GuidedStudent folder, which
    `difflab.load` reads) and its fit checkpoints to out_dir/steps-NNNN.checkpoints; with resume,
    finished rounds are loaded instead of retrained (refused, AddonMismatchError, when they were
    distilled from another starting model). callback(Step): steps and elapsed seconds count across
    rounds (`config.student_steps_at(step.step)` names the round).
    Returns FitResult: model = the to_steps-step student (eval, frozen); history across rounds;
    timings "steps-NNNN" per round (for a finished round read from disk: its loading) and "total".
    """
    config.validate()
    sigma_max = _grid_sigma_max(student, config.from_steps)
    origin = _fingerprint(student) if out_dir is not None else None
    student = student.train().requires_grad_(True)
    start, history, timings, last_fit = time.perf_counter(), [], {}, None
    for index, n in enumerate(config.rounds()):
        round_start = time.perf_counter()
        folder = None if out_dir is None else Path(out_dir) / f"steps-{n:04d}"
        if resume and folder is not None and (folder / "config.json").is_file():
            student, teacher = _finished_round(folder, origin, next(student.parameters()).device), None
        else:
            round_teacher = teacher if teacher is not None else freeze_copy(student)
            teacher = None
            offset = index * config.train_steps_per_round
            result = _fit_round(student, round_teacher, n, batches, config, sigma_max, folder,
                                _shifted(callback, offset, round_start - start, config.train_steps), progress, resume)
            student, last_fit = result.model.train().requires_grad_(True), result
            history += [(offset + step, loss) for step, loss in result.history]
            if hasattr(student, "distilled"):
                student.distilled.update({"stage": "progressive", "steps": n, "grid_sigma_max": sigma_max,
                                          "teacher": origin, "fit": config.to_dict()})
            if folder is not None and result.is_main_process:
                student.save(folder, overwrite=True)
        timings[f"steps-{n:04d}"] = time.perf_counter() - round_start
    timings["total"] = time.perf_counter() - start
    num_processes, process_index = _process_layout() if last_fit is None else (last_fit.num_processes,
                                                                               last_fit.process_index)
    return FitResult(student.eval().requires_grad_(False), history, timings, num_processes, process_index, student)


def _grid_sigma_max(student: nn.Module, from_steps: int) -> float:
    """The top of the cosine grid (the student's grid_sigma_max, else its sigma_max), checked to keep the
    from_steps-step teacher grid above the model's sigma_min."""
    sigma_max = getattr(student, "grid_sigma_max", None) or getattr(student, "sigma_max", None)
    if not sigma_max or sigma_max == float("inf"):
        raise ConfigError("progressive distillation needs the grid's sigma_max (the student has none)")
    sigma_min = getattr(student, "sigma_min", None) or 0.0
    finest = float(cosine_sigma(0.5 / (from_steps // 2), sigma_max))       # the teacher's smallest positive σ
    if finest < sigma_min * (1 - 1e-6):
        raise ConfigError(f"a {from_steps}-step teacher grid reaches sigma {finest:.3g}, below the model's sigma_min "
                          f"{sigma_min:.3g}; start from fewer steps")
    return float(sigma_max)


def _fit_round(student: nn.Module, teacher: Callable[..., Tensor], n: int, batches: BatchFn,
               config: ProgressiveDistillConfig, sigma_max: float, folder: Path | None,
               callback: StepCallback | None, progress: bool, resume: bool) -> FitResult:
    """One round on the loop: teacher 2n steps, student n; checkpoints beside the round's folder."""
    loss_fn = progressive_loss(teacher, n, batches, config.batch_size, sigma_max, config.w_range)
    loop_fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)}
    round_config = TrainConfig(**{**loop_fields, "train_steps": config.train_steps_per_round,
                                  "seed": config.seed + n})                 # fresh draws each round
    checkpoints = None if folder is None else folder.with_name(folder.name + ".checkpoints")
    return fit(student, loss_fn, round_config, out_dir=checkpoints, resume=resume, progress=progress,
               callback=callback, description=f"stage 2: {2 * n} → {n} steps")


def _shifted(callback: StepCallback | None, step_offset: int, seconds_offset: float, total: int):
    """callback with a round's Step records moved onto the run's step count and clock."""
    if callback is None:
        return None
    return lambda step: callback(dataclasses.replace(step, step=step.step + step_offset, total=total,
                                                     elapsed=step.elapsed + seconds_offset))


def _process_layout() -> tuple[int, int]:
    """(num_processes, process_index) when every round was loaded from disk and no fit ran."""
    from accelerate import PartialState

    state = PartialState()
    return state.num_processes, state.process_index


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
           "freeze_copy", "ProgressiveDistillConfig", "distill_progressive"]
