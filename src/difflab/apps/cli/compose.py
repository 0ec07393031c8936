"""`difflab compose`: SuperDiff OR / AND / averaging from the command line (docs/methods/superdiff.md).

    difflab compose --models A B [C …] | --model M --classes 3 8 [--w W]
                    [--mode or|and|average] [--sde|--ode] [--nfe N] [--temperature T] [--bias ℓ…]
                    [--n K] [--seed S] --out FILE(.npz|.png) [--force] [--device auto|cpu|cuda]

`--models`, `--classes` and `--bias` take several values after one flag (`--models a b c`); repeating
the flag (`--models a --models b`) works too. Every argument is checked before any sampling; the
output is written to a temporary file and renamed, so a failed run leaves nothing behind.
"""
from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from difflab.apps.cli.common import (
    DEVICE_OPTION,
    MAX_BATCH,
    MAX_SEED,
    MAX_STEPS,
    Device,
    check_output,
    greedy_options,
    resolve_device,
    writes_output,
)
from difflab.core.errors import ConfigError
from difflab.core.io import dumps_strict

GREEDY_OPTIONS = ("--models", "--classes", "--bias")
MAX_NFE = 10_000
PNG_MAX_SAMPLES = 256
STEP_SEED_OFFSET = 2**40   # per-step noise of sample i comes from seed SEED+i+2^40 (as `difflab sample`)


GreedyListGroup = greedy_options(TyperGroup, GREEDY_OPTIONS)


class Mode(str, Enum):
    or_ = "or"
    and_ = "and"
    average = "average"


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="SuperDiff: compose diffusion models by OR (mixture) or AND (equal densities).")


@app.callback(invoke_without_command=True, cls=GreedyListGroup)
@writes_output
def compose(
    models: Optional[List[Path]] = typer.Option(None, "--models", help="two or more model folders (OR/AND over "
                                                "separate models): --models A B [C …]"),
    model: Optional[Path] = typer.Option(None, "--model", help="one class-conditional model folder (use --classes)"),
    classes: Optional[List[int]] = typer.Option(None, "--classes", help="two or more class labels of --model: "
                                                "--classes 3 8"),
    w: Optional[float] = typer.Option(None, "--w", help="classifier-free guidance weight for --model "
                                      "(D_u + (1+w)(D_c − D_u)); the unguided classes' densities are tracked"),
    mode: Mode = typer.Option(Mode.or_, "--mode", help="composition: or (mixture) | and (equal densities) | "
                              "average (baseline)"),
    sde: bool = typer.Option(True, "--sde/--ode", help="reverse SDE with the Itô density estimator (no extra "
                             "model calls), or the ODE with a Hutchinson divergence (one JVP per step)"),
    nfe: int = typer.Option(100, "--nfe", help="model evaluations of each component: the number of steps, each "
                            "evaluating every model (or class) once, batched (ODE: one JVP each)"),
    noise_correction: bool = typer.Option(False, "--noise-correction", help="AND with --sde: add the Itô term "
                                          "of the noise AND's κ cancels (M−1 extra JVPs per step); removes "
                                          "a bias of the log q estimates"),
    temperature: float = typer.Option(1.0, "--temperature", help="OR: κ = softmax(T·log q + ℓ); T = 1 is the "
                                      "exact mixture"),
    bias: Optional[List[float]] = typer.Option(None, "--bias", help="ℓ, one number per model: --bias 0 0.5 "
                                               "(OR: logit offsets; AND: nats per unit log σ; average: log-weights)"),
    n: int = typer.Option(64, "--n", help="number of samples"),
    seed: int = typer.Option(0, "--seed", help="sample i uses seed SEED+i, whatever the batch size"),
    batch_size: int = typer.Option(256, "--batch-size", help="sampling batch: samples per composed model call"),
    out: Path = typer.Option(..., "--out", help="file to write: .npz (x [K, ...], log_q [K, M], kappa [K, M]) or "
                             ".png grid"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output file"),
    device: Device = DEVICE_OPTION,
) -> None:
    """Sample a SuperDiff composition of several models, or of one conditional model's classes."""
    plan = _validate(models, model, classes, w, nfe, bias, n, batch_size, out, force, mode.value, sde,
                     noise_correction, temperature, seed)
    dev = resolve_device(device)
    denoisers, conds, data_shape = _load(plan, dev, out)
    samples, log_q, kappa, calls = _sample(denoisers, conds, w, data_shape, mode.value, sde, nfe, temperature,
                                           bias, noise_correction, n, seed, batch_size, dev)
    _write(out, samples, log_q, kappa)
    typer.echo(dumps_strict({"out": str(out), "n": n, "mode": mode.value, "sde": sde, "nfe": nfe,
                             "models": plan["m"], "model_calls": calls,
                             "mean_log_q": [round(v, 4) for v in log_q.mean(0).tolist()]}))


def _validate(models, model, classes, w, nfe, bias, n, batch_size, out: Path, force: bool, mode: str,
              sde: bool, noise_correction: bool, temperature: float = 1.0, seed: int = 0) -> dict:
    """Every argument check that needs no model: raises ConfigError with what to fix."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"--temperature must be a finite number > 0 (1: the exact mixture), got {temperature}")
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must lie in [0, 2^62], got {seed}")
    if not (n <= MAX_STEPS and batch_size <= MAX_BATCH):
        raise ConfigError(f"--n must be <= {MAX_STEPS:,} and --batch-size <= {MAX_BATCH:,}; got {n} and {batch_size}")
    if any(not math.isfinite(v) for v in [*(bias or []), *([] if w is None else [w])]):
        raise ConfigError("--w and --bias must be finite numbers")
    if (models is None) == (model is None):
        raise ConfigError("give either --models A B [C …] (separate models) or --model M --classes C1 C2 …")
    if models is not None:
        if len(models) < 2:
            raise ConfigError(f"--models needs at least two model folders, got {len(models)}")
        if classes or w is not None:
            raise ConfigError("--classes and --w go with --model (one class-conditional model), not --models")
        m = len(models)
    else:
        if not classes or len(classes) < 2:
            raise ConfigError("--model composes the model's classes: give at least two, e.g. --classes 3 8")
        if any(c < 0 for c in classes):
            raise ConfigError(f"class labels must be >= 0 (−1 is the null label), got {classes}")
        if w is not None and w < 0:
            raise ConfigError(f"--w must be >= 0 (0: the plain conditional model), got {w}")
        m = len(classes)
    if not 1 <= nfe <= MAX_NFE:
        raise ConfigError(f"--nfe must lie in [1, {MAX_NFE}], got {nfe}")
    if bias is not None and len(bias) != m:
        raise ConfigError(f"--bias needs one number per model ({m}), got {len(bias)}: {bias}")
    if noise_correction and (mode != "and" or not sde):
        raise ConfigError("--noise-correction applies to --mode and with --sde (OR/average and the ODE need none)")
    if n < 1 or batch_size < 1:
        raise ConfigError(f"--n and --batch-size must be >= 1, got {n} and {batch_size}")
    check_output(out, force, (".npz", ".png"))
    if out.suffix == ".png" and n > PNG_MAX_SAMPLES:
        raise ConfigError(f"a .png grid holds at most {PNG_MAX_SAMPLES} samples, got --n {n}; write .npz instead")
    for folder in ([model] if models is None else models):
        if not folder.is_dir():
            raise ConfigError(f"model folder {folder} does not exist")
    return {"models": models, "model": model, "classes": classes, "m": m}


def _load(plan: dict, device: str, out: Path):
    """Load the models and check they fit together (shapes, classes, output kind)."""
    from difflab import load
    from difflab.data import model_class_list

    if plan["models"] is not None:
        denoisers = [load(folder, device=device) for folder in plan["models"]]
        conds = None
    else:
        denoiser = load(plan["model"], device=device)
        num_classes = _num_classes(denoiser)
        if num_classes == 0:
            raise ConfigError(f"{plan['model']} is not class-conditional; train it with `difflab train --conditional` "
                              "or use --models")
        known = model_class_list(denoiser, num_classes)   # less any it never saw (train --keep-classes)
        bad = [c for c in plan["classes"] if c not in known]
        if bad:
            raise ConfigError(f"class label(s) {bad} not among the classes {plan['model']} was trained on, {known}")
        denoisers, conds = denoiser, [{"class_labels": c} for c in plan["classes"]]
    shapes = {tuple(getattr(d, "data_shape", None) or ()) for d in (denoisers if conds is None else [denoisers])}
    if len(shapes) != 1 or () in shapes:
        raise ConfigError(f"the models must record one common data shape to compose, got {sorted(shapes)}")
    data_shape = shapes.pop()
    if out.suffix == ".png" and len(data_shape) != 3:
        raise ConfigError(f"a .png grid needs image data, these models' samples have shape {data_shape}")
    return denoisers, conds, data_shape


def _num_classes(denoiser) -> int:
    meta = getattr(denoiser, "meta", None) or {}
    if "num_classes" in meta:
        return int(meta["num_classes"])
    labels = getattr(denoiser, "labels", None)            # an exact GaussianMixture
    return int(labels.max()) + 1 if labels is not None and bool((labels >= 0).any()) else 0


def _sample(denoisers, conds, w, data_shape, mode, sde, nfe, temperature, bias, noise_correction, n, seed,
            batch_size, device):
    import torch

    from difflab.compose import Components, superdiff
    from difflab.sampling import PerSampleGenerator, get_sigmas, seeded_noise

    components = (Components.over_models(denoisers) if conds is None
                  else Components.over_conditions(denoisers, conds, w=w))
    sigma_min, sigma_max = components.sigma_range
    sigmas = get_sigmas("karras", nfe + 1, max(sigma_min or 0.002, 0.002), min(sigma_max or 80.0, 80.0))
    xs, log_qs, kappas, calls = [], [], [], 0
    # the ODE's divergence and AND's noise correction use JVPs (reverse mode where torch.func cannot trace)
    grad_mode = torch.no_grad() if sde and not noise_correction else torch.enable_grad()
    with grad_mode:
        for start in range(0, n, batch_size):
            seeds = range(seed + start, seed + min(n, start + batch_size))
            x = seeded_noise(seeds, data_shape, float(sigmas[0]), device=device)
            generator = PerSampleGenerator([s + STEP_SEED_OFFSET for s in seeds])
            result = superdiff(components, x, sigmas, mode=mode, sde=sde, temperature=temperature, bias=bias,
                               noise_correction=noise_correction, generator=generator)
            xs.append(result.x.detach().cpu())
            log_qs.append(result.log_q.cpu())
            kappas.append(result.kappa.cpu())
            calls += result.model_calls
    return torch.cat(xs), torch.cat(log_qs), torch.cat(kappas), calls


def _write(out: Path, samples, log_q, kappa) -> None:
    """.png: an image grid; .npz: x, log_q, kappa. Written to a temporary name and renamed."""
    import numpy as np

    from difflab.apps.figures import save_image_grid
    from difflab.core.io import atomic_path

    if out.suffix == ".png":
        save_image_grid(samples, out)
        return
    with atomic_path(out) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, x=samples.numpy(), log_q=log_q.numpy(), kappa=kappa.numpy())
