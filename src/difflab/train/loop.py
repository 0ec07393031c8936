"""The one training loop, on Hugging Face Accelerate, shared by every trainer in difflab.

A trainer supplies a model and `loss_fn(model, generator, step, micro) -> scalar`; the loss draws its
own batch (indices, noise levels, noise) from `generator`, which is seeded from (seed, step, rank,
micro), and may use the step and micro-batch indices (AMED's fitting does: step k trains interval k
mod (N−1) of a trajectory batch). That
makes a run reproducible and its resume exact without saving data-loader state: the batch of step
k is the same whether or not the run was interrupted before it.

Single CPU: plain PyTorch. `accelerate launch --num_processes N` (multi-GPU, multi-node, or CPU
processes with gloo): data-parallel, `batch_size` per process. EMA, gradient clipping, mixed
precision (bf16 on GPU by default), gradient accumulation, atomic checkpoints every
`checkpoint_every` steps, exact resume from `out_dir/checkpoint.safetensors`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from difflab.core.errors import ConfigError, ModelFormatError

CHECKPOINT_NAME = "checkpoint.safetensors"
LossFn = Callable[[nn.Module, torch.Generator, int, int], Tensor]   # (model, generator, step, micro)


@dataclass
class TrainConfig:
    """Hyper-parameters of a run; every field is saved in the checkpoint's metadata."""

    steps: int = 2000
    lr: float = 2e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    grad_accum: int = 1
    mixed_precision: str = "auto"          # auto: bf16 on CUDA, none on CPU; or "no" / "fp16" / "bf16"
    checkpoint_every: int = 500
    log_every: int = 25
    seed: int = 0
    device: str = "auto"                   # auto / cpu / cuda

    def validate(self) -> None:
        if self.steps < 1 or self.grad_accum < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ConfigError(f"steps, grad_accum, checkpoint_every and log_every must be >= 1: {self}")
        if self.lr <= 0 or not 0 <= self.ema_decay < 1:
            raise ConfigError(f"need lr > 0 and 0 <= ema_decay < 1, got lr={self.lr}, ema_decay={self.ema_decay}")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class TrainResult:
    model: nn.Module                       # the trained (unwrapped) model
    ema: nn.Module                         # its exponential moving average (use this to sample)
    losses: list[tuple[int, float]] = field(default_factory=list)   # (step, mean loss since last log)
    num_processes: int = 1
    process_index: int = 0                 # this process's rank (0: the one that writes files)

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0


def make_accelerator(config: TrainConfig) -> Accelerator:
    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
    precision = config.mixed_precision
    if precision == "auto":
        precision = "no" if cpu else "bf16"
    return Accelerator(cpu=cpu, mixed_precision=precision, gradient_accumulation_steps=config.grad_accum)


def ema_avg_fn(decay: float):
    """EMA with warm-up: decay_n = min(decay, (1 + n)/(10 + n)) after n updates, so a short run's
    average is not dominated by the initial weights (0.999^800 ≈ 0.45 without it)."""

    def avg_fn(averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        n = float(num_averaged)
        return torch.lerp(averaged, current, 1 - min(decay, (1 + n) / (10 + n)))

    return avg_fn


def step_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """The RNG of one micro-batch: a pure function of (seed, step, rank, micro) for exact resume."""
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}/{micro}".encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") >> 1)


def fit(model: nn.Module, loss_fn: LossFn, config: TrainConfig, out_dir: str | Path | None = None,
        resume: bool = True, progress: bool = True, description: str = "training",
        accelerator: Accelerator | None = None) -> TrainResult:
    """Train `model` by minimising `loss_fn` with Adam; returns the model and its EMA.

    out_dir: where checkpoints go (None: no checkpoints). With resume=True an existing checkpoint
    there is continued from its step; the result equals that of an uninterrupted run.
    """
    config.validate()
    accelerator = accelerator or make_accelerator(config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    ema = AveragedModel(model, avg_fn=ema_avg_fn(config.ema_decay), use_buffers=True)
    start_step, losses = 0, []
    ckpt = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    if resume and ckpt is not None and ckpt.is_file():
        start_step, losses = load_checkpoint(ckpt, model, ema, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(config.warmup_steps, 1)), last_epoch=start_step - 1)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)

    bar = _progress_bar(accelerator, progress, description, config.steps, start_step)
    running, count = 0.0, 0
    for step in range(start_step, config.steps):
        for micro in range(config.grad_accum):
            generator = step_generator(config.seed, step, accelerator.process_index, micro, accelerator.device)
            with accelerator.accumulate(wrapped):
                loss = loss_fn(wrapped, generator, step, micro)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.grad_clip > 0:
                    accelerator.clip_grad_norm_(wrapped.parameters(), config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running, count = running + loss.item(), count + 1
        scheduler.step()
        ema.update_parameters(accelerator.unwrap_model(wrapped))
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            mean_loss = accelerator.reduce(torch.tensor(running / count, device=accelerator.device), "mean").item()
            losses.append((step + 1, mean_loss))
            running, count = 0.0, 0
            if bar:
                bar[0].update(bar[1], completed=step + 1, loss=mean_loss)
        if ckpt is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(ckpt, step + 1, accelerator.unwrap_model(wrapped), ema, optimizer, config, losses)
    if bar:
        bar[0].stop()
    accelerator.wait_for_everyone()
    return TrainResult(accelerator.unwrap_model(wrapped), ema.module, losses, accelerator.num_processes,
                       accelerator.process_index)


def _progress_bar(accelerator: Accelerator, enabled: bool, description: str, total: int, done: int):
    if not (enabled and accelerator.is_main_process):
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn())
    task = bar.add_task(description, total=total, completed=done, loss=float("nan"))
    bar.start()
    return bar, task


# ----- checkpoints: one safetensors file, written to a temp file and renamed --------------------
def save_checkpoint(path: Path, step: int, model: nn.Module, ema: AveragedModel, optimizer,
                    config: TrainConfig, losses: list) -> None:
    """Model, EMA and Adam state as tensors; step, param groups, config and losses as metadata."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    opt_state = optimizer.state_dict()
    for pid, state in opt_state["state"].items():
        tensors |= {f"optim.{pid}.{k}": torch.as_tensor(v) for k, v in state.items()}
    meta = {"step": str(step), "param_groups": json.dumps(opt_state["param_groups"]),
            "config": json.dumps(asdict(config)), "losses": json.dumps(losses)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: Path, model: nn.Module, ema: AveragedModel, optimizer) -> tuple[int, list]:
    """Restore model, EMA and optimiser in place from `path`; returns (step, losses)."""
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        step, param_groups, losses = int(meta["step"]), json.loads(meta["param_groups"]), json.loads(meta["losses"])
    except Exception as err:  # any failure to read is a corrupt checkpoint, whatever raised it
        raise ModelFormatError(f"cannot resume from {path}: not a difflab checkpoint ({err}); "
                               "delete it or pass resume=False (CLI: --no-resume)") from err
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    except RuntimeError as err:
        raise ModelFormatError(f"{path} was written for another model: {err}") from err
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    return step, [tuple(x) for x in losses]
