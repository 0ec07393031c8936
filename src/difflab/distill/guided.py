"""Stage 1 of guided distillation: one student for every guidance weight (Meng et al. 2023, §3.1).

The student x̂_η(z, c, w) regresses onto the classifier-free-guided teacher
x̂^w = (1 + w)·x̂_c − w·x̂_u (`CFGDenoiser`, both halves in one batched call) at w ~ U[w_min, w_max]
and z from forward-diffused data (no teacher sampling), with the truncated-SNR weight:

    L(η) = E_{x, c, w, σ, ε} max(SNR_σ, 1)·‖x̂_η(x + σε, σ, c, w) − x̂^w(x + σε, σ, c)‖²
                                                                       (docs/methods/distillation.md (4))

σ is drawn on the cosine schedule between the teacher's σ_min and σ_max (`training_sigmas`).
Training runs on difflab's one Accelerate loop (`train.loop.fit`), configured by `GuidedDistillConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from difflab.core.denoiser import append_dims
from difflab.core.errors import ConfigError
from difflab.distill.schedule import training_sigmas, truncated_snr_weight
from difflab.distill.student import GuidedStudent
from difflab.train.contract import FitResult, StepCallback
from difflab.train.loop import TrainConfig, fit

BatchFn = Callable[[torch.Generator, int], tuple[Tensor, dict[str, Any]]]   # (generator, B) -> (x0 [B, ...], cond)


def dataset_batches(x: Tensor, labels: Tensor | None = None) -> BatchFn:
    """batch_fn(generator, B) -> (x0 [B, ...], {"class_labels": [B]}) drawn uniformly from x: [N, ...] (and
    labels [N]); the batch lands on the generator's device, so the data may stay on the CPU."""
    if labels is not None and len(labels) != len(x):
        raise ConfigError(f"{len(x)} samples but {len(labels)} labels; expected one label per sample")

    def batch_fn(generator: torch.Generator, batch_size: int) -> tuple[Tensor, dict[str, Any]]:
        device = generator.device
        idx = torch.randint(len(x), (batch_size,), generator=generator, device=device).to(x.device)
        cond = {} if labels is None else {"class_labels": labels[idx].to(device)}
        return x[idx].to(device), cond

    return batch_fn


def guidance_weights(batch_size: int, generator: torch.Generator, w_range: tuple[float, float],
                     device: torch.device | str) -> Tensor:
    """w ~ U[w_min, w_max]: [B] float32."""
    w_min, w_max = w_range
    u = torch.rand(batch_size, generator=generator, device=generator.device)
    return (w_min + (w_max - w_min) * u).to(device)


def check_w_range(w_range: tuple[float, float]) -> tuple[float, float]:
    w_min, w_max = (float(v) for v in w_range)
    if not 0 <= w_min <= w_max:
        raise ConfigError(f"the guidance range must satisfy 0 <= w_min <= w_max, got [{w_min}, {w_max}]")
    return w_min, w_max


def guided_loss(teacher: Callable[..., Tensor], batch_fn: BatchFn, batch_size: int,
                w_range: tuple[float, float] = (0.0, 4.0), sigma_min: float = 0.002, sigma_max: float = 80.0):
    """loss_fn(student, generator, step, micro) for `fit`: the stage-1 loss above.

    teacher: the guided teacher, `teacher(x, σ, w=w, **cond)` (a CFGDenoiser); batch_fn: see
    `dataset_batches`. Teacher targets are computed without gradients, in float32.
    """
    w_range = check_w_range(w_range)

    def loss_fn(student: nn.Module, generator: torch.Generator, step: int = 0, micro: int = 0) -> Tensor:
        x0, cond = batch_fn(generator, batch_size)
        device = x0.device
        sigma = training_sigmas(batch_size, generator, sigma_min, sigma_max, device).to(x0.dtype)
        w = guidance_weights(batch_size, generator, w_range, device).to(x0.dtype)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=x0.dtype).to(device)
        x_sigma = x0 + append_dims(sigma, x0.ndim) * noise                           # forward-diffused data
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            target = teacher(x_sigma.float(), sigma.float(), w=w.float(), **cond).to(x0.dtype)   # x̂^w, one call
        x0_hat = student(x_sigma, sigma, w=w, **cond)
        weight = append_dims(truncated_snr_weight(sigma), x0.ndim)                   # max(SNR, 1)
        return (weight * (x0_hat - target).square()).mean()

    return loss_fn


@dataclass
class GuidedDistillConfig(TrainConfig):
    """Stage 1's hyper-parameters: the loop's (`TrainConfig`) plus the batch per process and the range
    w ~ U[w_range] of guidance weights; round-trips through JSON, saved in the student's config.json."""

    lr: float = 1e-3
    batch_size: int = 128
    w_range: tuple[float, float] = (0.0, 4.0)

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        check_w_range(self.w_range)


def distill_guided(teacher: Callable[..., Tensor], student: nn.Module, batches: BatchFn,
                   config: GuidedDistillConfig = GuidedDistillConfig(), *, out_dir: str | Path | None = None,
                   callback: StepCallback | None = None, progress: bool = True,
                   resume: bool = True) -> FitResult[GuidedStudent]:
    """Stage 1: train `student` (from `make_student`) on the guided `teacher` (a CFGDenoiser taking `w=`).

    batches: see `dataset_batches`. The student's σ range (its sigma_min / sigma_max, else the
    teacher's) sets where σ is drawn. out_dir: the loop's checkpoints (exact resume); callback(Step)
    at every log point. Returns FitResult: model = the student's EMA (eval, frozen), with the stage,
    the w range and `config` recorded in its `distilled` dict (hence its config.json).
    """
    config.validate()
    sigma_min = getattr(student, "sigma_min", None) or getattr(teacher, "sigma_min", None) or 0.002
    sigma_max = getattr(student, "sigma_max", None) or getattr(teacher, "sigma_max", None) or 80.0
    if not 0 < sigma_min < sigma_max < float("inf"):
        raise ConfigError(f"need a finite noise range 0 < sigma_min < sigma_max for the student, got "
                          f"[{sigma_min}, {sigma_max}]; build its denoiser with sigma_min / sigma_max")
    loss_fn = guided_loss(teacher, batches, config.batch_size, config.w_range, sigma_min, sigma_max)
    w_min, w_max = check_w_range(config.w_range)
    if hasattr(student, "distilled"):
        student.distilled.update({"w_min": w_min, "w_max": w_max, "stage": "guided", "steps": None})
    result = fit(student, loss_fn, config, out_dir=out_dir, resume=resume, progress=progress, callback=callback,
                 description="stage 1: guided distillation")
    if hasattr(result.model, "distilled"):   # after the fit: a resumed run may change train_steps, device...
        result.model.distilled["fit"] = config.to_dict()
    result.model.eval().requires_grad_(False)
    return result


__all__ = ["BatchFn", "dataset_batches", "guidance_weights", "guided_loss", "GuidedDistillConfig", "distill_guided",
           "check_w_range"]
