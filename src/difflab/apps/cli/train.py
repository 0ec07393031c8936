"""`difflab train`: a base denoiser (EDM preconditioning and loss) on an embedded data set or a folder."""
from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from difflab.apps.cli.common import MAX_BATCH, MAX_SEED, MAX_STEPS, Device, check_output
from difflab.core.errors import ConfigError


class Net(str, Enum):
    auto = "auto"
    mlp = "mlp"
    unet = "unet"
    cunet = "cunet"


def train(
    data: str = typer.Option("digits", help="digits | moons | rings | gmm | PATH (image folder or HF dataset on disk)"),
    net: Net = typer.Option(Net.auto, help="mlp (vectors), unet or cunet (images); auto picks by data shape"),
    classes: bool = typer.Option(False, "--classes", help="class-conditional (with a null class for guidance)"),
    label_dropout: float = typer.Option(0.1, min=0.0, max=1.0, help="with --classes: probability of training on the "
                                        "null class instead (classifier-free guidance needs > 0)"),
    keep_classes: Optional[List[int]] = typer.Option(None, "--keep-classes", help="train only on the samples of "
                                                     "these classes: --keep-classes 0 1 2 3 4 (recorded in the "
                                                     "model's config as kept_classes)"),
    steps: int = typer.Option(2000, min=1, max=MAX_STEPS, help="optimiser steps"),
    batch_size: int = typer.Option(128, min=1, max=MAX_BATCH, help="batch per process"),
    lr: float = typer.Option(2e-3, help="Adam learning rate (finite, > 0)"),
    channels: int = typer.Option(None, min=1, max=4096, help="U-Net base channels / MLP width (default: the network's)"),
    out: Path = typer.Option(..., help="model folder to write (config.json + model.safetensors)"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED),
    device: Device = typer.Option(Device.auto),
    force: bool = typer.Option(False, help="overwrite an existing model folder"),
    resume: bool = typer.Option(True, help="continue from OUT/checkpoints if present"),
) -> None:
    """Train a base denoiser (EDM preconditioning and loss) on an embedded dataset or a folder.

    Runs unchanged under `accelerate launch --num_processes N difflab train ...` (multi-GPU, multi-node).
    """
    from difflab.data import get_dataset, keep_classes as keep_only
    from difflab.nets import MLP, CUNet, UNet
    from difflab.train import TrainConfig
    from difflab.train.denoiser import train_denoiser

    check_output(out, force)
    if not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"--lr must be a finite number > 0, got {lr}")
    dataset = get_dataset(data, seed=seed)
    if label_dropout != 0.1 and not classes:
        raise ConfigError("--label-dropout needs --classes")
    if classes and dataset.labels is None:
        raise ConfigError(f"--classes needs labels, but data set {data!r} has none")
    kept = None if keep_classes is None else sorted(set(keep_classes))
    dataset = keep_only(dataset, kept, data)
    is_image = len(dataset.shape) == 3
    kind = net.value if net != Net.auto else ("unet" if is_image else "mlp")
    if (kind != "mlp") != is_image:
        raise ConfigError(f"--net {kind} does not fit data of per-sample shape {dataset.shape}")
    num_classes = dataset.num_classes if classes else 0
    width = {} if channels is None else ({"base_channels": channels} if kind != "mlp" else {"hidden": channels})
    image_nets = {"unet": UNet, "cunet": CUNet}
    network = (image_nets[kind](in_channels=dataset.shape[0], num_classes=num_classes, **width) if kind != "mlp"
               else MLP(dim=dataset.shape[0], num_classes=num_classes, **width))
    config = TrainConfig(steps=steps, lr=lr, seed=seed, device=device.value)
    denoiser, result = train_denoiser(network, dataset.x, dataset.labels if classes else None, config,
                                      batch_size=batch_size, dataset=str(data), label_dropout=label_dropout,
                                      out_dir=out.with_name(out.name + ".checkpoints"), resume=resume)
    if kept is not None:
        denoiser.meta["kept_classes"] = kept
    if result.is_main_process:
        denoiser.save(out, overwrite=force)
        typer.echo(json.dumps({"out": str(out), "steps": steps, "final_loss": result.losses[-1][1],
                               "processes": result.num_processes}))
