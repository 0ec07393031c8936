"""`difflab train`: a base denoiser (EDM preconditioning and loss) on an embedded data set or a folder."""
from __future__ import annotations

import dataclasses
import math
from enum import Enum
from pathlib import Path
from typing import List, Optional

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
    writes_output,
)
from difflab.core.errors import ConfigError
from difflab.core.io import dumps_strict


class Net(str, Enum):
    auto = "auto"
    mlp = "mlp"
    unet = "unet"
    cunet = "cunet"


@writes_output
def train(
    data: str = typer.Option("digits", help="data set to train on: digits | mnist (28x28, after `make data`) | moons "
                             "| rings | gmm | PATH (image folder or HF dataset on disk)"),
    net: Net = typer.Option(Net.auto, help="network to train: mlp (vectors), unet or cunet (images); auto picks by "
                            "data shape"),
    conditional: bool = typer.Option(False, "--conditional", help="train a class-conditional model (with a null "
                                     "class for classifier-free guidance); the data set must have labels"),
    label_dropout: float = typer.Option(0.1, min=0.0, max=1.0, help="with --conditional: probability of training on "
                                        "the null class instead (classifier-free guidance needs > 0)"),
    keep_classes: Optional[List[int]] = typer.Option(None, "--keep-classes", help="class labels to keep: train only on "
                                                     "their samples, --keep-classes 0 1 2 3 4 (recorded in the "
                                                     "model's config as kept_classes)"),
    train_steps: int = typer.Option(2000, min=1, max=MAX_STEPS, help="optimiser steps"),
    batch_size: int = typer.Option(128, min=1, max=MAX_BATCH, help="training batch per optimiser step and process"),
    lr: float = typer.Option(2e-3, help="Adam learning rate (finite, > 0)"),
    channels: int = typer.Option(None, min=1, max=4096, help="U-Net base channels / MLP width "
                                 "(default: the network's)"),
    out: Path = typer.Option(..., help="model folder to write (config.json + model.safetensors)"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="random seed of the run (initial weights, batches)"),
    device: Device = DEVICE_OPTION,
    force: bool = typer.Option(False, help="overwrite an existing model folder"),
    resume: bool = RESUME_OPTION,
    checkpoint_every: Optional[int] = CHECKPOINT_EVERY_OPTION,
    divergence_rollbacks: int = typer.Option(0, min=0, max=10, help="when the logged loss reaches twice its best "
                                             "so far, go back to the last healthy state with half the learning "
                                             "rate, up to this many times (0: go on, and warn at the end)"),
) -> None:
    """Train a base denoiser (EDM preconditioning and loss) on an embedded dataset or a folder.

    Runs unchanged under `accelerate launch --num_processes N difflab train ...` (multi-GPU, multi-node).
    """
    import torch

    from difflab.data import get_dataset
    from difflab.data import keep_classes as keep_only
    from difflab.nets import MLP, CUNet, UNet
    from difflab.train.contract import loss_divergence
    from difflab.train.denoiser import DenoiserConfig, train_denoiser

    check_output(out, force)
    if not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"--lr must be a finite number > 0, got {lr}")
    dataset = get_dataset(data, seed=seed)
    if label_dropout != 0.1 and not conditional:
        raise ConfigError("--label-dropout needs --conditional")
    if conditional and dataset.labels is None:
        raise ConfigError(f"--conditional needs labels, but data set {data!r} has none")
    kept = None if keep_classes is None else sorted(set(keep_classes))
    dataset = keep_only(dataset, kept, data)
    is_image = len(dataset.shape) == 3
    kind = net.value if net != Net.auto else ("unet" if is_image else "mlp")
    if (kind != "mlp") != is_image:
        raise ConfigError(f"--net {kind} does not fit data of per-sample shape {dataset.shape}")
    num_classes = dataset.num_classes if conditional else 0
    width = {} if channels is None else ({"base_channels": channels} if kind != "mlp" else {"hidden": channels})
    image_nets = {"unet": UNet, "cunet": CUNet}
    torch.manual_seed(seed)   # the initial weights: two runs with the same --seed give the same model
    network = (image_nets[kind](in_channels=dataset.shape[0], num_classes=num_classes, **width) if kind != "mlp"
               else MLP(dim=dataset.shape[0], num_classes=num_classes, **width))
    overrides, resume_mode = fitting(checkpoint_every, resume, force)
    config = DenoiserConfig(**overrides, train_steps=train_steps, lr=lr, seed=seed, device=device.value,
                            batch_size=batch_size, dataset=str(data), label_dropout=label_dropout,
                            divergence_rollbacks=divergence_rollbacks)
    result = train_denoiser(network, dataset.x, dataset.labels if conditional else None, config,
                            out_dir=out.with_name(out.name + ".checkpoints"),
                            resume=resume_mode)
    denoiser = result.model
    if kept is not None:
        denoiser.meta["kept_classes"] = kept
    divergence = loss_divergence(result.history)   # one not rolled back from (train_denoiser warned)
    if result.is_main_process:
        denoiser.save(out, overwrite=force)
        typer.echo(dumps_strict({"out": str(out), "train_steps": train_steps, "final_loss": result.final_loss,
                                 "processes": result.num_processes,
                                 "rollbacks": [dataclasses.asdict(d) for d in result.rollbacks],
                                 "divergence": None if divergence is None else dataclasses.asdict(divergence)}))
