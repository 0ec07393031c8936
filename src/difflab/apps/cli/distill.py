"""`difflab distill guided | progressive`: the two stages of guided distillation (Meng et al., CVPR 2023).

Mounted by the main app as `difflab distill`. Every mistake the user can fix is a DifflabError raised
before any training; model folders are written atomically; `--force` replaces an existing one.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional, Tuple

import typer

from difflab.apps.cli.common import (
    CHECKPOINT_EVERY_OPTION,
    DEVICE_OPTION,
    MAX_BATCH,
    MAX_SEED,
    MAX_STEPS,
    RESUME_OPTION,
    Device,
    check_output,
    fitting,
    resolve_device,
    writes_output,
)
from difflab.core.errors import ConfigError
from difflab.core.io import dumps_strict

app = typer.Typer(no_args_is_help=True, help="Distil a classifier-free-guided model into a few-step student: "
                  "stage 1 (one student for every guidance weight w), stage 2 (progressive halving of the steps).")


def _conditional_teacher(path: Path, device: str):
    """The class-conditional base model of stage 1, checked: a difflab network with classes."""
    from difflab.core.wrappers import EDMDenoiser
    from difflab.distill.student import GuidedStudent, PredictionDenoiser
    from difflab.models import load

    teacher = load(path, device=device)
    if isinstance(teacher, GuidedStudent):
        raise ConfigError(f"{path} is already a distilled student; stage 1 starts from the class-conditional model "
                          "(`difflab train --conditional`); for stage 2 use `difflab distill progressive --teacher`")
    if not isinstance(teacher, (EDMDenoiser, PredictionDenoiser)):
        raise ConfigError(f"{path} holds a {type(teacher).__name__}; stage 1 needs a difflab network model trained "
                          "with `difflab train --conditional`")
    num_classes = int(teacher.net.config.get("num_classes", 0))
    if num_classes < 1:
        raise ConfigError(f"{path} is not class-conditional (num_classes=0), so it has no guidance to distil; "
                          "train it with `difflab train --conditional` (label dropout gives the null class)")
    return teacher, num_classes


def _training_data(data: Optional[str], model, num_classes: int, seed: int):
    """The labelled data set to diffuse (default: the one the model was trained on, only the classes
    it kept), checked against it."""
    from difflab.data import model_dataset

    name = data or (getattr(model, "meta", {}) or {}).get("dataset") or getattr(model, "distilled", {}).get("dataset")
    if not name:
        raise ConfigError("the model does not record its data set; pass --data")
    dataset = model_dataset(name, model, seed=seed)   # only the classes the model was trained on
    if dataset.labels is None:
        raise ConfigError(f"data set {name!r} has no labels; guided distillation needs the class of each sample")
    if model.data_shape is not None and tuple(dataset.shape) != tuple(model.data_shape):
        raise ConfigError(f"data set {name!r} has per-sample shape {dataset.shape}, "
                          f"the model {tuple(model.data_shape)}")
    if int(dataset.labels.max()) >= num_classes:
        raise ConfigError(f"data set {name!r} has labels up to {int(dataset.labels.max())}, the model knows "
                          f"{num_classes} classes")
    return str(name), dataset


@app.command("guided")
@writes_output
def guided(
    teacher: Path = typer.Option(..., help="teacher model folder: a class-conditional model (`difflab train "
                                 "--conditional`) or a diffusers text-to-image folder (with --prompt)"),
    w_range: Tuple[float, float] = typer.Option((0.0, 4.0), "--w-range", help="classifier-free guidance weights w ~ "
                                                "U[W_MIN, W_MAX] (w = 0: the conditional model; diffusers' scale is "
                                                "1 + w)"),
    data: Optional[str] = typer.Option(None, help="data set to diffuse (default: the teacher's; a text-to-image "
                                       "teacher: its own samples for the prompts)"),
    prompts: Optional[List[str]] = typer.Option(None, "--prompt", help="a text prompt of a text-to-image teacher "
                                                "to distil on, one per flag: --prompt \"a cat\" --prompt \"a dog\""),
    train_steps: int = typer.Option(2000, min=1, max=MAX_STEPS, help="optimiser steps"),
    batch_size: int = typer.Option(128, min=1, max=MAX_BATCH, help="training batch per optimiser step and process"),
    lr: float = typer.Option(1e-3, min=1e-8, max=10.0, help="Adam learning rate"),
    out: Path = typer.Option(..., help="student folder to write"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="random seed of the run (initial noise, batches)"),
    device: Device = DEVICE_OPTION,
    force: bool = typer.Option(False, help="overwrite an existing student folder"),
    resume: bool = RESUME_OPTION,
    checkpoint_every: Optional[int] = CHECKPOINT_EVERY_OPTION,
) -> None:
    """Stage 1: one student x̂(z, c, w) that matches the guided teacher for every w in --w-range.

    A diffusers text-to-image teacher gives a diffusers pipeline folder that a stock pipeline runs with
    guidance_scale = 1 + w (`difflab.interop.diffusers.student`)."""
    import torch

    from difflab.core.fingerprint import fingerprint
    from difflab.core.wrappers import CFGDenoiser
    from difflab.data import model_classes
    from difflab.distill import GuidedDistillConfig, dataset_batches, distill_guided, make_student
    from difflab.distill.guided import check_w_range
    from difflab.interop.diffusers.loader import is_diffusers_folder

    check_output(out, force)
    w_min, w_max = check_w_range(w_range)
    dev = resolve_device(device)
    overrides, resume_mode = fitting(checkpoint_every, resume, force)
    config = GuidedDistillConfig(train_steps=train_steps, lr=lr, batch_size=batch_size, w_range=(w_min, w_max),
                                 seed=seed, device=dev, **({"checkpoint_every": max(train_steps // 4, 1)} | overrides))
    if is_diffusers_folder(teacher):
        _guided_text_to_image(teacher, prompts or [], data, config, out, force, resume_mode)
        return
    if prompts:
        raise ConfigError(f"--prompt needs a diffusers text-to-image teacher; {teacher} is not a diffusers folder "
                          "(unet/ scheduler/ vae/ text_encoder/ tokenizer/)")
    model, num_classes = _conditional_teacher(teacher, dev)
    name, dataset = _training_data(data, model, num_classes, seed)
    base_id = fingerprint(model)
    torch.manual_seed(seed)   # the w slot's initial weights: two runs with the same --seed give the same student
    student = make_student(model, base_model=base_id, teacher=base_id, dataset=name, w_min=w_min, w_max=w_max,
                           kept_classes=model_classes(model))
    start = time.perf_counter()
    result = distill_guided(CFGDenoiser(model), student, dataset_batches(dataset.x, dataset.labels), config,
                            out_dir=out.with_name(out.name + ".checkpoints"), resume=resume_mode)
    if result.is_main_process:
        result.model.save(out, overwrite=force)
        typer.echo(dumps_strict({"out": str(out), "stage": "guided", "w_range": [w_min, w_max],
                                 "train_steps": train_steps,
                                 "final_loss": result.final_loss, "seconds": round(time.perf_counter() - start, 1),
                                 "base_model": base_id[:12]}))


def _guided_text_to_image(folder: Path, prompts: list[str], data: Optional[str], config, out: Path, force: bool,
                          resume_mode) -> None:
    """Stage 1 from a diffusers text-to-image teacher (loaded on --device) on its own samples (w = 0) for the
    prompts; the student (the UNet with diffusers' guidance embedding) is written as a diffusers pipeline folder."""
    import torch

    from difflab.core.fingerprint import fingerprint
    from difflab.core.wrappers import CFGDenoiser
    from difflab.distill import distill_guided
    from difflab.interop.diffusers.student import (
        load_text_teacher,
        make_diffusers_student,
        prompt_batches,
        save_diffusers_student,
        teacher_latents,
    )

    teacher = load_text_teacher(folder, device=config.device)
    if data is not None:
        raise ConfigError("a text-to-image teacher is distilled on its own samples for the --prompt's; drop --data")
    if not prompts:
        raise ConfigError(f"{folder} is a text-to-image model: give the prompts to distil on, one per flag: "
                          "--prompt \"a cat\" --prompt \"a dog\"")
    base_id = fingerprint(teacher)     # of the folder's stored weights, whatever its place and dtype
    embeddings = teacher.encode_prompts(prompts)
    x0, prompt_ids = teacher_latents(teacher.denoiser, embeddings, per_prompt=config.batch_size, seed=config.seed)
    w_min, w_max = config.w_range
    torch.manual_seed(config.seed)
    student = make_diffusers_student(teacher.denoiser, base_model=base_id, teacher=base_id, dataset="teacher samples",
                                     w_min=w_min, w_max=w_max)
    start = time.perf_counter()
    result = distill_guided(CFGDenoiser(teacher.denoiser, uncond=teacher.null_condition), student,
                            prompt_batches(x0, prompt_ids, embeddings), config,
                            out_dir=out.with_name(out.name + ".checkpoints"), resume=resume_mode)
    if result.is_main_process:
        save_diffusers_student(result.model, folder, out, overwrite=force)
        typer.echo(dumps_strict({"out": str(out), "stage": "guided", "w_range": [w_min, w_max],
                                 "train_steps": config.train_steps, "prompts": len(prompts),
                                 "final_loss": result.final_loss, "seconds": round(time.perf_counter() - start, 1),
                                 "base_model": base_id[:12], "format": "diffusers"}))


@app.command("progressive")
@writes_output
def progressive(
    teacher: Path = typer.Option(..., help="teacher model folder: a w-conditioned student (from `difflab distill "
                                 "guided`, or a round of a previous progressive run)"),
    from_steps: int = typer.Option(256, help="the teacher's sampling steps, a power of two (one model evaluation "
                                   "each: the teacher's NFE)"),
    to_steps: int = typer.Option(1, help="the final student's sampling steps, a power of two below --from-steps "
                                 "(its NFE for `difflab sample --nfe`)"),
    data: Optional[str] = typer.Option(None, help="data set to diffuse (default: the teacher's)"),
    train_steps_per_round: int = typer.Option(1000, min=1, max=MAX_STEPS, help="optimiser steps per halving round"),
    batch_size: int = typer.Option(128, min=1, max=MAX_BATCH, help="training batch per optimiser step and process"),
    lr: float = typer.Option(1e-4, min=1e-8, max=10.0, help="Adam learning rate "
                             "(restarted, with warm-up, every round)"),
    out: Path = typer.Option(..., help="the final student's folder to write; every round's student goes to "
                             "OUT.rounds/steps-NNNN"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="random seed of the run (round N uses SEED+N)"),
    device: Device = DEVICE_OPTION,
    force: bool = typer.Option(False, help="overwrite an existing output folder"),
    resume: bool = typer.Option(True, help="continue from the finished rounds and checkpoints in OUT.rounds"),
    checkpoint_every: Optional[int] = CHECKPOINT_EVERY_OPTION,
) -> None:
    """Stage 2: halve the sampling steps round by round (teacher 2N steps → student N), from --from-steps to
    --to-steps."""
    from difflab.distill import ProgressiveDistillConfig, dataset_batches, distill_progressive
    from difflab.distill.progressive import check_halving
    from difflab.distill.student import GuidedStudent
    from difflab.models import load

    check_output(out, force)
    check_halving(from_steps, to_steps)
    dev = resolve_device(device)
    student = load(teacher, device=dev)
    if not isinstance(student, GuidedStudent):
        raise ConfigError(f"{teacher} holds a {type(student).__name__}; stage 2 starts from a w-conditioned student: "
                          "run `difflab distill guided` first")
    if student.w_slot != "extra":
        raise ConfigError(f"{teacher} is a diffusers student; stage 2 (progressive halving) is for difflab students "
                          "only: its cosine σ-grid is not one a stock diffusers scheduler makes")
    if student.steps is not None and student.steps != from_steps:
        raise ConfigError(f"{teacher} was distilled for {student.steps} steps; continue from it with --from-steps "
                          f"{student.steps}")
    name, dataset = _training_data(data, student, student.num_classes, seed)
    overrides, resume_mode = fitting(checkpoint_every, resume, force)
    config = ProgressiveDistillConfig(from_steps=from_steps, to_steps=to_steps,
                                      train_steps_per_round=train_steps_per_round, lr=lr,
                                      batch_size=batch_size, w_range=(student.distilled["w_min"],
                                                                      student.distilled["w_max"]),
                                      seed=seed, device=dev,
                                      **({"checkpoint_every": max(train_steps_per_round // 4, 1)} | overrides))
    rounds_dir = out.with_name(out.name + ".rounds")
    start = time.perf_counter()
    result = distill_progressive(student, dataset_batches(dataset.x, dataset.labels), config, out_dir=rounds_dir,
                                 resume=resume_mode)
    if result.is_main_process:
        result.model.save(out, overwrite=force)
    typer.echo(dumps_strict({"out": str(out), "stage": "progressive", "rounds": config.rounds(), "to_steps": to_steps,
                             "rounds_dir": str(rounds_dir), "seconds": round(time.perf_counter() - start, 1)}))
