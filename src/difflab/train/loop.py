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
`checkpoint_every` steps, exact resume from `out_dir/checkpoint.safetensors` (of the same run only: the
checkpoint records the run's definition). `fit` follows the contract of `train.contract`: a
`TrainConfig`, `callback(Step)` at each log point, a `FitResult`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from difflab.core.errors import ConfigError, DifflabError, DivergenceWarning, ModelFormatError, NonFiniteError, warn
from difflab.core.io import atomic_path
from difflab.train.contract import Divergence, FitResult, JSONConfig, Step, StepCallback, loss_divergence

CHECKPOINT_NAME = "checkpoint.safetensors"
HEALTHY_NAME = "healthy.safetensors"   # with rollbacks: the state a rollback goes to, beside the checkpoint
ROLLBACK_LR_FACTOR = 0.5               # each rollback halves the learning rate
LossFn = Callable[[nn.Module, torch.Generator, int, int], Tensor]   # (model, generator, step, micro)
# config fields a resumed run may change: how long it runs, how often it logs and saves, where it runs
RESUMABLE_FIELDS = ("train_steps", "checkpoint_every", "log_every", "device", "divergence_rollbacks")
SAME_RUN = "same_run"   # resume= value: continue a checkpoint of this run, start afresh over another run's


@dataclass
class TrainConfig(JSONConfig):
    """Hyper-parameters of a run (the loop's; method configs derive from this and add their own).
    Every field is saved in the checkpoint's metadata; the CLI option of `train_steps` is `--train-steps`."""

    train_steps: int = 2000
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
        if min(self.train_steps, self.grad_accum, self.checkpoint_every, self.log_every) < 1:
            raise ConfigError(f"train_steps, grad_accum, checkpoint_every and log_every must be >= 1: {self}")
        if not (math.isfinite(self.lr) and self.lr > 0) or not 0 <= self.ema_decay < 1:
            raise ConfigError(f"need lr > 0 and 0 <= ema_decay < 1, got lr={self.lr}, ema_decay={self.ema_decay}")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")


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


def fit(model: nn.Module, loss_fn: LossFn, config: TrainConfig, *, out_dir: str | Path | None = None,
        callback: StepCallback | None = None, resume: bool | str = True, progress: bool = True,
        description: str = "training", accelerator: Accelerator | None = None,
        run: dict[str, Any] | None = None, rollbacks: int = 0) -> FitResult[nn.Module]:
    """Train `model` by minimising `loss_fn` with Adam.

    Returns a FitResult whose model is the EMA where config.ema_decay > 0, else the trained model
    itself (raw_model: the trained model in both cases). callback(Step) runs on process 0 at every
    log point. out_dir: where checkpoints go (None: no checkpoints). With resume=True an existing
    checkpoint there is continued from its step, and the result equals that of an uninterrupted run;
    it must come from the same run: the config (but RESUMABLE_FIELDS), the model's config and `run`
    (what else defines it: data, base model; JSON) must match, else ConfigError names what differs.
    resume="same_run" (the CLI's --force) resumes a checkpoint of this same run and starts afresh over
    any other one (it is overwritten at the first checkpoint); resume=False always starts afresh.
    A non-finite loss stops the fit (NonFiniteError) before it reaches the weights or a checkpoint.
    rollbacks: up to this many times, when the logged loss diverges (`train.contract.loss_divergence`:
    ≥ 2× the best before it), go back to the state at the log point before (the last the criterion calls
    healthy: weights, EMA, Adam; kept in memory, and beside the checkpoint so that a resume is exact) and
    go on with the learning rate halved, with a DivergenceWarning; only for losses comparable from step
    to step (a denoiser's).
    """
    config.validate()
    start = time.perf_counter()
    accelerator = accelerator or make_accelerator(config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    ema = AveragedModel(model, avg_fn=ema_avg_fn(config.ema_decay), use_buffers=True)
    definition = run_definition(model, config, run)
    start_step, losses, guard, (running, count) = 0, [], _Rollbacks(rollbacks), (0.0, 0)
    ckpt = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    if resume and ckpt is not None and ckpt.is_file() and (resume != SAME_RUN or _is_same_run(ckpt, definition)):
        start_step, losses, done, (running, count) = load_checkpoint(ckpt, model, ema, optimizer, definition)
        guard = _Rollbacks(rollbacks, done, _read_healthy(ckpt.with_name(HEALTHY_NAME), definition))
    raw_optimizer = optimizer
    scheduler = _warmup(optimizer, config, start_step)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)

    bar = _progress_bar(accelerator, progress, description, config.train_steps, start_step)
    step = start_step
    while step < config.train_steps:
        lr = optimizer.param_groups[0]["lr"]
        for micro in range(config.grad_accum):
            generator = step_generator(config.seed, step, accelerator.process_index, micro, accelerator.device)
            with accelerator.accumulate(wrapped):
                loss = loss_fn(wrapped, generator, step, micro)
                value = _finite_loss(accelerator, loss, step, micro, ckpt, bar)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.grad_clip > 0:
                    accelerator.clip_grad_norm_(wrapped.parameters(), config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running, count = running + value, count + 1
        scheduler.step()
        ema.update_parameters(accelerator.unwrap_model(wrapped))
        if (step + 1) % config.log_every == 0 or step + 1 == config.train_steps:
            mean_loss = accelerator.reduce(torch.tensor(running / count, device=accelerator.device), "mean").item()
            losses.append((step + 1, mean_loss))
            running, count = 0.0, 0
            if bar:
                bar[0].update(bar[1], completed=step + 1, loss=mean_loss)
            if callback is not None and accelerator.is_main_process:
                callback(Step(step + 1, config.train_steps, mean_loss, lr, time.perf_counter() - start))
            divergence = guard.after_log(losses, functools.partial(
                _snapshot, step + 1, accelerator.unwrap_model(wrapped), ema, raw_optimizer, config, losses, definition,
                guard.done))
            if divergence is not None:
                step, losses = guard.roll_back(accelerator.unwrap_model(wrapped), ema, raw_optimizer, config.lr)
                scheduler = _warmup(raw_optimizer, config, step)
                warn(f"{description}: {divergence.rise()}; went back to step {step} and halved the "
                     f"learning rate to {raw_optimizer.param_groups[0]['initial_lr']:.3g} (rollback "
                     f"{len(guard.done)} of {rollbacks})", DivergenceWarning)
                continue
        if ckpt is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.train_steps):
            # the losses since the last log point (their mean over processes), so a resume logs the same means
            partial_loss = (accelerator.reduce(torch.tensor(running, dtype=torch.float64, device=accelerator.device),
                                               "mean").item(), count)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                guard.save_beside(ckpt)   # first: a checkpoint never goes without the healthy state before it
                save_checkpoint(ckpt, step + 1, accelerator.unwrap_model(wrapped), ema, optimizer, config, losses,
                                definition, guard.done, partial_loss)
        step += 1
    if bar:
        bar[0].stop()
    accelerator.wait_for_everyone()
    trained = accelerator.unwrap_model(wrapped)
    return FitResult(ema.module if config.ema_decay > 0 else trained, losses, {"total": time.perf_counter() - start},
                     accelerator.num_processes, accelerator.process_index, raw_model=trained, rollbacks=guard.done,
                     start_step=start_step)


def _warmup(optimizer: torch.optim.Optimizer, config: TrainConfig, start_step: int):
    """Linear warm-up over config.warmup_steps to each group's initial_lr, then constant; at `start_step`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(config.warmup_steps, 1)), last_epoch=start_step - 1)


class _Rollbacks:
    """`fit`'s rollbacks: the budget, the divergences rolled back from, and the last healthy state (the
    last log point with no divergence in the history), kept in memory and written beside the checkpoint."""

    def __init__(self, budget: int, done: list[Divergence] | None = None, healthy: _Snapshot | None = None):
        self.budget, self.done, self.healthy, self.saved = budget, done or [], healthy, True

    def after_log(self, losses: list[tuple[int, float]], snapshot: Callable[[], _Snapshot]) -> Divergence | None:
        """At a log point: the divergence to roll back from (budget left and a healthy state kept), else None
        (and, when the history is healthy, this state, `snapshot()`, becomes the one to go back to)."""
        if not self.budget:
            return None
        divergence = loss_divergence(losses)
        if divergence is None:
            self.healthy, self.saved = snapshot(), False
            return None
        if self.healthy is None or len(self.done) >= self.budget:
            return None
        self.done.append(divergence)
        return divergence

    def roll_back(self, model: nn.Module, ema: AveragedModel, optimizer, lr: float) -> tuple[int, list]:
        """Restore the healthy state in place, with the learning rate `lr` halved once per rollback so far.
        Returns (the step to go on from, the loss history up to it)."""
        restored = _restore(self.healthy, model, ema, optimizer)
        for group in optimizer.param_groups:
            group["initial_lr"] = lr * ROLLBACK_LR_FACTOR ** len(self.done)
        return restored.step, restored.losses

    def save_beside(self, ckpt: Path) -> None:
        if not self.saved:
            _write(ckpt.with_name(HEALTHY_NAME), self.healthy)
            self.saved = True


def _finite_loss(accelerator: Accelerator, loss: Tensor, step: int, micro: int, ckpt: Path | None, bar) -> float:
    """loss.item(), or NonFiniteError (on every process at once) before the loss reaches the weights."""
    value = loss.item()
    bad = not math.isfinite(value)
    if accelerator.num_processes > 1:   # every process stops together, none waits for the others
        bad = accelerator.reduce(torch.tensor(float(bad), device=accelerator.device), "sum").item() > 0
    if bad:
        if bar:
            bar[0].stop()
        kept = f"the last good checkpoint, {ckpt}, is kept" if ckpt is not None and ckpt.is_file() else \
            "no checkpoint was written"
        raise NonFiniteError(f"the loss is not finite ({value}) at step {step + 1} (micro-batch {micro}); {kept}. "
                             "Lower the learning rate (or the grad_clip), or check the data for NaNs")
    return value


def run_definition(model: nn.Module, config: TrainConfig, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """What defines a run, as plain JSON: the config (less RESUMABLE_FIELDS), the model's config and
    `run` (the caller's: data fingerprint and size, base model fingerprint...)."""
    fields = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_FIELDS}
    definition = {"config": fields, "model": _model_definition(model), **(run or {})}
    return json.loads(json.dumps(definition, sort_keys=True, default=str))


def _model_definition(model: nn.Module) -> Any:
    """The model's config (a `config()` method or a `config` dict); for a model that has none, or
    cannot give one (a diffusers student), its class and parameter shapes."""
    model_config = getattr(model, "config", None)
    try:
        model_config = model_config() if callable(model_config) else model_config
    except DifflabError:
        model_config = None
    if isinstance(model_config, dict):
        return {k: v for k, v in model_config.items() if k != "difflab_version"}
    return {"class": type(model).__name__, "parameters": {k: list(p.shape) for k, p in model.named_parameters()}}


def data_fingerprint(*tensors: Tensor | None) -> str:
    """A short hash of the tensors' shapes, dtypes and values (None entries count too)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        if tensor is None:
            digest.update(b"none")
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{tuple(tensor.shape)}|{tensor.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()[:16]


def _progress_bar(accelerator: Accelerator, enabled: bool, description: str, total: int, done: int):
    if not (enabled and accelerator.is_main_process):
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    # on stderr: stdout stays for the commands' JSON
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), console=Console(stderr=True))
    task = bar.add_task(description, total=total, completed=done, loss=float("nan"))
    bar.start()
    return bar, task


# ----- checkpoints: one safetensors file, written to a temp file and renamed --------------------
class Progress(NamedTuple):
    """How far a restored run had got: optimiser steps done, the loss history [(step, mean loss)], the
    rollbacks made, and (sum, count) of the losses since the last log point."""

    step: int
    losses: list[tuple[int, float]]
    rollbacks: list[Divergence]
    partial_loss: tuple[float, int]


@dataclass
class _Snapshot:
    """A training state in checkpoint form (what `save_checkpoint` writes), in memory."""

    tensors: dict[str, Tensor]
    meta: dict[str, str]


def _snapshot(step: int, model: nn.Module, ema: AveragedModel, optimizer, config: TrainConfig, losses: list,
              definition: dict | None = None, rollbacks: list[Divergence] = (),
              partial_loss: tuple[float, int] = (0.0, 0)) -> _Snapshot:
    """Model, EMA and Adam state as tensors (CPU copies); step, param groups, config, losses, rollbacks, the
    partial loss (`Progress`) and the run's definition (`run_definition`) with its sha256 as metadata."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    opt_state = optimizer.state_dict()
    for pid, state in opt_state["state"].items():
        tensors |= {f"optim.{pid}.{k}": torch.as_tensor(v) for k, v in state.items()}
    meta = {"step": str(step), "param_groups": json.dumps(opt_state["param_groups"]),
            "config": config.to_json(), "losses": json.dumps(losses),
            "rollbacks": json.dumps([dataclasses.asdict(d) for d in rollbacks]),
            "partial_loss": json.dumps(list(partial_loss))}
    if definition is not None:
        meta |= {"run": json.dumps(definition, sort_keys=True), "run_fingerprint": _sha256(definition)}
    return _Snapshot({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, meta)


def _write(path: Path, snapshot: _Snapshot) -> None:
    with atomic_path(path) as tmp:
        save_file(snapshot.tensors, tmp, metadata=snapshot.meta)


def save_checkpoint(path: Path, step: int, model: nn.Module, ema: AveragedModel, optimizer,
                    config: TrainConfig, losses: list, definition: dict | None = None,
                    rollbacks: list[Divergence] = (), partial_loss: tuple[float, int] = (0.0, 0)) -> None:
    """The training state (`_snapshot`) as one safetensors file at `path`, written atomically."""
    _write(path, _snapshot(step, model, ema, optimizer, config, losses, definition, rollbacks, partial_loss))


def _read(path: Path) -> _Snapshot:
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        int(meta["step"])
        json.loads(meta["param_groups"])
        json.loads(meta["losses"])
    except Exception as err:  # any failure to read is a corrupt checkpoint, whatever raised it
        raise ModelFormatError(f"cannot resume from {path}: not a difflab checkpoint ({err}); "
                               "delete it or pass resume=False (CLI: --no-resume)") from err
    return _Snapshot(tensors, meta)


def load_checkpoint(path: Path, model: nn.Module, ema: AveragedModel, optimizer,
                    definition: dict | None = None) -> Progress:
    """Restore model, EMA and optimiser in place from `path`; returns how far the run had got. With a
    `definition`, ConfigError unless the checkpoint was written by that same run."""
    snapshot = _read(path)
    if definition is not None:
        check_same_run(path, json.loads(snapshot.meta["run"]) if "run" in snapshot.meta else None, definition)
    try:
        return _restore(snapshot, model, ema, optimizer)
    except RuntimeError as err:
        raise ModelFormatError(f"{path} was written for another model: {err}") from err


def _restore(snapshot: _Snapshot, model: nn.Module, ema: AveragedModel, optimizer) -> Progress:
    """Load a snapshot into model, EMA and optimiser in place; returns how far the run had got."""
    tensors, meta = snapshot.tensors, snapshot.meta
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value.clone()
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    rollbacks = [Divergence(**d) for d in json.loads(meta.get("rollbacks", "[]"))]
    loss_sum, loss_count = json.loads(meta.get("partial_loss", "[0.0, 0]"))
    return Progress(int(meta["step"]), [tuple(x) for x in json.loads(meta["losses"])], rollbacks,
                    (loss_sum, loss_count))


def _read_healthy(path: Path, definition: dict) -> _Snapshot | None:
    """The healthy state kept beside a checkpoint of this run, or None (none kept, or another run's)."""
    return _read(path) if path.is_file() and _is_same_run(path, definition) else None


def _is_same_run(path: Path, current: dict) -> bool:
    """Whether the checkpoint at `path` was written by the run `current` defines (an unreadable one was not)."""
    try:
        with safe_open(path, "pt") as f:
            saved = json.loads(f.metadata()["run"])
    except Exception:   # unreadable or pre-definition checkpoints are another run's as far as resuming goes
        return False
    return _sha256(saved) == _sha256(current)


def check_same_run(path: Path, saved: dict | None, current: dict) -> None:
    """ConfigError naming the fields (dotted) where the checkpoint's run definition differs from this run's."""
    if saved is None:
        raise ConfigError(f"{path} records no run definition (written by an older difflab), so this run cannot "
                          "be checked against it; pass resume=False (CLI: --no-resume) to start afresh")
    if _sha256(saved) == _sha256(current):
        return
    old, new = _flatten(saved), _flatten(current)
    differing = [key for key in sorted(old.keys() | new.keys()) if old.get(key, "(absent)") != new.get(key, "(absent)")]
    details = "; ".join(f"{key}: {old.get(key, '(absent)')!r} in the checkpoint, {new.get(key, '(absent)')!r} now"
                        for key in differing[:8])
    raise ConfigError(f"{path} was written by a different run ({len(differing)} field(s) differ: {details}); "
                      "resume with the same settings, or pass resume=False (CLI: --no-resume) to start afresh, "
                      "or write to another folder")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _sha256(definition: dict) -> str:
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()
