"""The `difflab` command (typer + rich). Every difflab error becomes one line and exit status 2."""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .errors import ConfigError, DifflabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="difflab: get more out of trained diffusion models (σ-space denoisers, exact "
                       "Gaussian-mixture checks, few-step sampling, composition, inverse problems, distillation).")


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Net(str, Enum):
    auto = "auto"
    mlp = "mlp"
    unet = "unet"


def fail(message: str) -> None:
    """One line on stderr, exit status 2: how every mistake the user can fix ends."""
    typer.echo(f"error: {message}", err=True)
    sys.exit(2)


def resolve_device(device: Device) -> str:
    import torch

    if device == Device.cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but torch sees no CUDA device; use --device cpu")
    return "cuda" if device == Device.auto and torch.cuda.is_available() else ("cpu" if device == Device.auto else device.value)


def check_output(path: Path, force: bool, suffixes: tuple[str, ...] | None = None) -> None:
    """Validate an output path before any work: suffix, and no silent overwrite."""
    if suffixes and path.suffix not in suffixes:
        raise ConfigError(f"--out {path} must end in one of {', '.join(suffixes)}")
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists; pass --force to overwrite it")


@app.command()
def train(
    data: str = typer.Option("digits", help="digits | moons | rings | gmm | PATH (image folder or HF dataset on disk)"),
    net: Net = typer.Option(Net.auto, help="mlp (vectors), unet (images); auto picks by data shape"),
    classes: bool = typer.Option(False, "--classes", help="class-conditional (with a null class for guidance)"),
    steps: int = typer.Option(2000, min=1, help="optimiser steps"),
    batch_size: int = typer.Option(128, min=1, help="batch per process"),
    lr: float = typer.Option(2e-3, help="Adam learning rate"),
    channels: int = typer.Option(None, help="U-Net base channels / MLP width (default: the network's)"),
    out: Path = typer.Option(..., help="model folder to write (config.json + model.safetensors)"),
    seed: int = typer.Option(0),
    device: Device = typer.Option(Device.auto),
    force: bool = typer.Option(False, help="overwrite an existing model folder"),
    resume: bool = typer.Option(True, help="continue from OUT/checkpoints if present"),
) -> None:
    """Train a base denoiser (EDM preconditioning and loss) on an embedded dataset or a folder.

    Runs unchanged under `accelerate launch --num_processes N difflab train ...` (multi-GPU, multi-node).
    """
    from .data import get_dataset
    from .nets import MLP, UNet
    from .train import TrainConfig
    from .train.denoiser import train_denoiser

    check_output(out, force)
    dataset = get_dataset(data, seed=seed)
    if classes and dataset.labels is None:
        raise ConfigError(f"--classes needs labels, but data set {data!r} has none")
    is_image = len(dataset.shape) == 3
    kind = net.value if net != Net.auto else ("unet" if is_image else "mlp")
    if (kind == "unet") != is_image:
        raise ConfigError(f"--net {kind} does not fit data of per-sample shape {dataset.shape}")
    num_classes = dataset.num_classes if classes else 0
    width = {} if channels is None else ({"base_channels": channels} if kind == "unet" else {"hidden": channels})
    network = (UNet(in_channels=dataset.shape[0], num_classes=num_classes, **width) if kind == "unet"
               else MLP(dim=dataset.shape[0], num_classes=num_classes, **width))
    config = TrainConfig(steps=steps, lr=lr, seed=seed, device=device.value)
    denoiser, result = train_denoiser(network, dataset.x, dataset.labels if classes else None, config,
                                      batch_size=batch_size, dataset=str(data),
                                      out_dir=out.with_name(out.name + ".checkpoints"), resume=resume)
    if result.is_main_process:
        denoiser.save(out, overwrite=force)
        typer.echo(json.dumps({"out": str(out), "steps": steps, "final_loss": result.losses[-1][1],
                               "processes": result.num_processes}))


@app.command()
def sample(
    model: Path = typer.Option(..., help="model folder (difflab or diffusers)"),
    solver: str = typer.Option("heun", help="euler | heun | dpm2 | dpmpp_2m | dpmpp_3m | ipndm | ipndm_v | unipc | "
                               "deis | euler_maruyama | amed (with --predictor)"),
    nfe: Optional[int] = typer.Option(None, min=1, help="model evaluations to spend; the grid is built to spend "
                                      "exactly this (default 35; with --solver amed, the predictor's)"),
    grid: str = typer.Option("karras", help="karras | logsnr | time_uniform | time_quadratic | discrete"),
    afs: bool = typer.Option(False, "--afs", help="analytical first step: replace the first evaluation by "
                             "x/sqrt(1+σ²) (saves one evaluation)"),
    to_zero: bool = typer.Option(True, help="end the grid with σ = 0 (a last Euler step to the denoised sample, "
                                 "as in EDM: Heun at 35 NFE = 18 steps)"),
    predictor: Optional[Path] = typer.Option(None, help="AMED predictor folder (from `difflab amed fit`)"),
    n: int = typer.Option(64, min=1, help="number of samples"),
    seed: int = typer.Option(0, help="sample i uses seed SEED+i, whatever the batch size"),
    batch_size: int = typer.Option(256, min=1),
    class_label: Optional[int] = typer.Option(None, "--class", help="class label for a conditional model"),
    out: Path = typer.Option(..., help=".npz (array `x`) or .png (image grid)"),
    device: Device = typer.Option(Device.auto),
    force: bool = typer.Option(False, help="overwrite an existing output file"),
) -> None:
    """Sample a model with a solver at an exact NFE budget; writes .npz or a .png grid."""
    import torch

    from . import load

    check_output(out, force, (".npz", ".png"))
    if (solver == "amed") != (predictor is not None):
        raise ConfigError("--solver amed needs --predictor DIR, and --predictor needs --solver amed")
    dev = resolve_device(device)
    denoiser = load(model, device=dev)
    data_shape = getattr(denoiser, "data_shape", None)
    if data_shape is None:
        raise ConfigError(f"{model} does not record its data shape; cannot draw noise for it")
    if out.suffix == ".png" and len(data_shape) != 3:
        raise ConfigError(f"a .png grid needs image data, this model's samples have shape {tuple(data_shape)}")
    run = (_amed_runner(denoiser, predictor, nfe, dev) if solver == "amed"
           else _solver_runner(denoiser, solver, 35 if nfe is None else nfe, grid, afs, to_zero))
    chunks = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            seeds = range(seed + start, seed + min(n, start + batch_size))
            cond = {} if class_label is None else {"class_labels": torch.full((len(seeds),), class_label, device=dev)}
            chunks.append(run(seeds, data_shape, dev, cond).cpu())
    _write_samples(torch.cat(chunks), out)
    typer.echo(json.dumps({"out": str(out), "n": n, "solver": solver, "nfe": run.nfe, "points": run.points}))


def _solver_runner(denoiser, solver: str, nfe: int, grid: str, afs: bool, to_zero: bool):
    """A batch sampler for a registered solver on the grid that spends exactly `nfe`."""
    from .sampling import PerSampleGenerator, sample as run_sample, seeded_noise, sigmas_for_nfe

    sigma_min = max(getattr(denoiser, "sigma_min", 0.002) or 0.002, 0.002)
    sigma_max = min(getattr(denoiser, "sigma_max", 80.0), 80.0)
    sigmas = sigmas_for_nfe(solver, nfe, grid, sigma_min, sigma_max, afs=afs, to_zero=to_zero)

    def run(seeds, shape, device, cond):
        x = seeded_noise(seeds, shape, float(sigmas[0]), device=device)
        # a stochastic solver's per-step noise comes from seeds disjoint from the initial noise's
        generator = PerSampleGenerator([s + 2**40 for s in seeds])
        return run_sample(denoiser, x, sigmas, solver=solver, generator=generator, afs=afs, **cond)

    run.nfe, run.points = nfe, len(sigmas)
    return run


def _amed_runner(denoiser, predictor_dir: Path, nfe: int | None, device: str):
    """A batch sampler for AMED-Solver with a fitted predictor (refused for another model or NFE)."""
    from .sampling import seeded_noise
    from .sampling.amed import amed_solver, check_predictor, load_predictor, predictor_sigmas

    predictor = load_predictor(predictor_dir, base_model=denoiser, nfe=nfe, device=device)
    sigmas = predictor_sigmas(predictor)
    afs = predictor.fitted_for.get("afs", True)
    check_predictor(predictor, denoiser, sigmas, afs)

    def run(seeds, shape, device, cond):
        x = seeded_noise(seeds, shape, float(sigmas[0]), device=device)
        return amed_solver(denoiser, x, sigmas, predictor, afs=afs, check=False, **cond)

    run.nfe, run.points = predictor.nfe, len(sigmas)
    return run


def _write_samples(samples, out: Path) -> None:
    """.png: an image grid; .npz: array `x`. Written to a temporary name and renamed."""
    import numpy as np

    from .report import save_image_grid

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        save_image_grid(samples, out)
        return
    tmp = out.with_name(f".{out.name}.tmp.npz")
    np.savez(tmp, x=samples.numpy())
    tmp.replace(out)


amed_app = typer.Typer(no_args_is_help=True, help="AMED: a tiny learned predictor for ~5-step sampling "
                                                  "(Zhou et al., CVPR 2024).")
app.add_typer(amed_app, name="amed")


@amed_app.command("fit")
def amed_fit(
    model: Path = typer.Option(..., help="base model folder"),
    nfe: int = typer.Option(5, min=2, help="evaluations to fit for (with AFS: 3, 5, 7, 9 ↔ 3, 4, 5, 6 grid points)"),
    base_solver: str = typer.Option("dpm2", help="dpm2 (AMED-Solver); AMED-Plugin on other solvers is not "
                                    "implemented yet"),
    grid: str = typer.Option("karras", help="grid family (the teacher uses the same family)"),
    teacher: str = typer.Option("heun", help="teacher solver for the reference trajectories"),
    m: int = typer.Option(1, "--M", min=0, help="extra teacher points per student interval"),
    trajectories: int = typer.Option(10_000, min=1, help="teacher trajectories to fit on"),
    batch_size: int = typer.Option(128, min=1),
    out: Path = typer.Option(..., help="predictor folder to write"),
    seed: int = typer.Option(0),
    device: Device = typer.Option(Device.auto),
    force: bool = typer.Option(False, help="overwrite an existing predictor folder"),
) -> None:
    """Fit an AMED predictor for a model, NFE and grid; saves it as an add-on naming its base model."""
    from . import load
    from .train.amed import default_config, fit_amed

    check_output(out, force)
    if base_solver != "dpm2":
        raise ConfigError(f"--base-solver {base_solver!r}: only dpm2 (AMED-Solver) is implemented; "
                          "AMED-Plugin on other solvers is not yet")
    dev = resolve_device(device)
    denoiser = load(model, device=dev)
    predictor = fit_amed(denoiser, nfe, grid=grid, teacher=teacher, M=m, trajectories=trajectories,
                         batch_size=batch_size, config=default_config(seed=seed, device=dev),
                         out_dir=out.with_name(out.name + ".checkpoints"), progress=True)
    predictor.save(out, overwrite=force)
    typer.echo(json.dumps({"out": str(out), "nfe": nfe, "grid": grid, "parameters":
                           sum(p.numel() for p in predictor.parameters())}))


@app.command()
def info(model: Path = typer.Argument(..., help="model folder")) -> None:
    """Print a model folder's config and parameter count as JSON."""
    from .models import info as model_info

    typer.echo(json.dumps(model_info(model), indent=2, sort_keys=True, default=str))


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="output folder"),
    quick: bool = typer.Option(False, help="a short run (smoke test)"),
    seed: int = typer.Option(0),
    device: Device = typer.Option(Device.auto),
) -> None:
    """The main job: train a digits denoiser and a 2-D one, sample them, write grids and metrics."""
    from .demo import run_demo

    summary = run_demo(out, quick=quick, seed=seed, device=resolve_device(device))
    typer.echo(json.dumps(summary, indent=2))


def main() -> None:
    try:
        app(standalone_mode=False)
    except (DifflabError, FileExistsError) as err:
        fail(str(err))
    except Exception as err:  # click's usage errors arrive here in non-standalone mode
        if hasattr(err, "format_message"):
            fail(err.format_message())
        if type(err).__name__ == "Abort":
            fail("aborted")
        raise


if __name__ == "__main__":
    main()
