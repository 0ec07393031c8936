"""`difflab compose`: SuperDiff OR / AND / averaging from the command line (docs/methods/superdiff.md).

    difflab compose --models A B [C …] [--prompt P …] | --model M --classes 3 8 [--w W]
                    | --model M --prompt P1 --prompt P2 [--w W] [--negative-prompt N]
                    [--mode or|and|average] [--sde|--ode] [--nfe N] [--temperature T] [--bias ℓ…]
                    [--n K] [--seed S] --out FILE(.npz|.png) [--force] [--device auto|cpu|cuda]

`--models`, `--classes` and `--bias` take several values after one flag (`--models a b c`); repeating
the flag (`--models a --models b`) works too; `--prompt` takes one prompt per flag. A text-to-image model
(a Stable Diffusion folder) composes its prompts; its samples are latents, decoded into images for the output
(with `--models`, by the first model's decoder). Every argument is checked before any sampling; the
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
    MAX_NFE,
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
    model: Optional[Path] = typer.Option(None, "--model", help="one conditional model folder: its classes "
                                         "(--classes) or, for a text-to-image model, its prompts (--prompt)"),
    classes: Optional[List[int]] = typer.Option(None, "--classes", help="two or more class labels of --model: "
                                                "--classes 3 8"),
    prompts: Optional[List[str]] = typer.Option(None, "--prompt", help="a text prompt of a text-to-image model, "
                                                "one per flag: --prompt \"a cat\" --prompt \"a dog\" (--model: two "
                                                "or more, composed; --models: one per model, or one for all)"),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="the negative prompt: the null "
                                                  "condition of guidance --w over --prompt's (default: \"\")"),
    w: Optional[float] = typer.Option(None, "--w", help="classifier-free guidance weight for --model "
                                      "(D_u + (1+w)(D_c − D_u)); the unguided classes' (prompts') densities are "
                                      "tracked"),
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
    out: Path = typer.Option(..., "--out", help="file to write: .npz (x [K, ...], log_q [K, M], kappa [K, M]; a "
                             "text-to-image model's x are latents, plus images [K, 3, H, W] in [0, 1]) or .png grid"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing output file"),
    device: Device = DEVICE_OPTION,
) -> None:
    """Sample a SuperDiff composition of several models, or of one conditional model's classes or prompts."""
    plan = _validate(models, model, classes, w, nfe, bias, n, batch_size, out, force, mode.value, sde,
                     noise_correction, temperature, seed, prompts, negative_prompt)
    dev = resolve_device(device)
    components, decode = _components(plan, w, dev, out)
    samples, images, log_q, kappa, calls = _sample(components, decode, mode.value, sde, nfe, temperature, bias,
                                                   noise_correction, n, seed, batch_size, dev)
    _write(out, samples, images, log_q, kappa)
    summary = {"out": str(out), "n": n, "mode": mode.value, "sde": sde, "nfe": nfe, "models": plan["m"]}
    if plan["prompts"]:
        summary["prompts"] = plan["prompts"]
    typer.echo(dumps_strict({**summary, "model_calls": calls,
                             "mean_log_q": [round(v, 4) for v in log_q.mean(0).tolist()]}))


def _validate(models, model, classes, w, nfe, bias, n, batch_size, out: Path, force: bool, mode: str,
              sde: bool, noise_correction: bool, temperature: float = 1.0, seed: int = 0, prompts=None,
              negative_prompt: str | None = None) -> dict:
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
        raise ConfigError("give either --models A B [C …] (separate models) or --model M with --classes C1 C2 … "
                          "or --prompt P1 --prompt P2 …")
    prompts = list(prompts or [])
    if negative_prompt is not None and (not prompts or w is None or models is not None):
        raise ConfigError("--negative-prompt is the null condition of guidance over prompts: it goes with "
                          "--model M --prompt P1 --prompt P2 --w W")
    if models is not None:
        if len(models) < 2:
            raise ConfigError(f"--models needs at least two model folders, got {len(models)}")
        if classes or w is not None:
            raise ConfigError("--classes and --w go with --model (one conditional model), not --models")
        if prompts and len(prompts) not in (1, len(models)):
            raise ConfigError(f"--models takes one --prompt per model ({len(models)}) or one for all, "
                              f"got {len(prompts)}")
        m = len(models)
    elif prompts:
        if classes:
            raise ConfigError("--classes and --prompt both given: compose --model's classes or its prompts, not both")
        if len(prompts) < 2:
            raise ConfigError(f"--model composes its prompts: give at least two, e.g. --prompt \"a cat\" --prompt "
                              f"\"a dog\" (got {len(prompts)})")
        if w is not None and w < 0:
            raise ConfigError(f"--w must be >= 0 (0: the plain conditional model), got {w}")
        m = len(prompts)
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
    return {"models": models, "model": model, "classes": classes, "prompts": prompts,
            "negative_prompt": negative_prompt, "m": m}


def _components(plan: dict, w, device: str, out: Path):
    """(what to compose, the latent decoder or None): the models loaded and checked to fit together."""
    from difflab.compose import Components

    denoisers, conds, data_shape = _load(plan, device)
    if out.suffix == ".png" and len(data_shape) != 3:
        raise ConfigError(f"a .png grid needs image data, these models' samples have shape {data_shape}")
    if plan["models"] is not None:
        return Components.over_models(denoisers, conds), (denoisers[0].decode if plan["prompts"] else None)
    if plan["prompts"]:
        components = Components.over_prompts(denoisers, plan["prompts"], w=w,
                                             negative_prompt=plan["negative_prompt"] or "")
        return components, denoisers.decode
    return Components.over_conditions(denoisers, conds, w=w), None


def _takes_prompts(denoiser) -> bool:
    return callable(getattr(denoiser, "encode_prompts", None)) and callable(getattr(denoiser, "decode", None))


def _load(plan: dict, device: str):
    """Load the models and check they fit together (shapes, classes or prompts)."""
    from difflab import load

    if plan["models"] is not None:
        denoisers = [load(folder, device=device) for folder in plan["models"]]
        conds = _model_prompts(plan, denoisers)
    elif plan["prompts"]:
        denoisers, conds = load(plan["model"], device=device), None
        if not _takes_prompts(denoisers):
            raise ConfigError(f"{plan['model']} takes no text prompts; --prompt composes a text-to-image model (a "
                              "Stable Diffusion folder): use --classes for a class-conditional model")
    else:
        denoisers, conds = _load_classes(plan, device)
    shapes = {tuple(getattr(d, "data_shape", None) or ()) for d in (denoisers if plan["models"] else [denoisers])}
    if len(shapes) != 1 or () in shapes:
        raise ConfigError(f"the models must record one common data shape to compose, got {sorted(shapes)}")
    return denoisers, conds, shapes.pop()


def _model_prompts(plan: dict, denoisers: list) -> list[dict] | None:
    """--models' conditions: each text-to-image model's own prompt embedding [1, tokens, dim], or None."""
    takes = [_takes_prompts(d) for d in denoisers]
    if plan["prompts"] and not all(takes):
        folders = [str(f) for f, t in zip(plan["models"], takes) if not t]
        raise ConfigError(f"--prompt needs text-to-image models; {', '.join(folders)} take(s) no text prompts")
    if not plan["prompts"]:
        if any(takes):
            folders = [str(f) for f, t in zip(plan["models"], takes) if t]
            raise ConfigError(f"text-to-image model(s) {', '.join(folders)} need a prompt: give --prompt, one per "
                              "model or one for all")
        return None
    prompts = plan["prompts"] * len(denoisers) if len(plan["prompts"]) == 1 else plan["prompts"]
    return [{"encoder_hidden_states": d.encode_prompts([p])} for d, p in zip(denoisers, prompts)]


def _load_classes(plan: dict, device: str):
    """--model with --classes: the model and one class-label condition per class."""
    from difflab import load
    from difflab.data import model_class_list

    denoiser = load(plan["model"], device=device)
    if _takes_prompts(denoiser):
        raise ConfigError(f"{plan['model']} is a text-to-image model: compose its prompts with --prompt \"a cat\" "
                          "--prompt \"a dog\", not --classes")
    num_classes = _num_classes(denoiser)
    if num_classes == 0:
        raise ConfigError(f"{plan['model']} is not class-conditional; train it with `difflab train --conditional` "
                          "or use --models")
    known = model_class_list(denoiser, num_classes)   # less any it never saw (train --keep-classes)
    bad = [c for c in plan["classes"] if c not in known]
    if bad:
        raise ConfigError(f"class label(s) {bad} not among the classes {plan['model']} was trained on, {known}")
    return denoiser, [{"class_labels": c} for c in plan["classes"]]


def _num_classes(denoiser) -> int:
    meta = getattr(denoiser, "meta", None) or {}
    if "num_classes" in meta:
        return int(meta["num_classes"])
    labels = getattr(denoiser, "labels", None)            # an exact GaussianMixture
    return int(labels.max()) + 1 if labels is not None and bool((labels >= 0).any()) else 0


def _sample(components, decode, mode, sde, nfe, temperature, bias, noise_correction, n, seed, batch_size, device):
    """(samples [n, ...], decoded images [n, 3, H, W] in [0, 1] or None, log_q [n, M], kappa [n, M], model calls)."""
    import torch

    from difflab.compose import superdiff
    from difflab.sampling import PerSampleGenerator, get_sigmas, seeded_noise
    from difflab.sampling.grids import EDM_RANGE, model_sigma_range

    data_shape = tuple(components.denoisers[0].data_shape)
    sigmas = get_sigmas("karras", nfe + 1, *model_sigma_range(components, default=EDM_RANGE))
    xs, images, log_qs, kappas, calls = [], [], [], [], 0
    # the ODE's divergence and AND's noise correction use JVPs (reverse mode where torch.func cannot trace)
    grad_mode = torch.no_grad() if sde and not noise_correction else torch.enable_grad()
    for start in range(0, n, batch_size):
        seeds = range(seed + start, seed + min(n, start + batch_size))
        x = seeded_noise(seeds, data_shape, float(sigmas[0]), device=device)
        generator = PerSampleGenerator([s + STEP_SEED_OFFSET for s in seeds])
        with grad_mode:
            result = superdiff(components, x, sigmas, mode=mode, sde=sde, temperature=temperature, bias=bias,
                               noise_correction=noise_correction, generator=generator)
        xs.append(result.x.detach().cpu())
        if decode is not None:              # a text-to-image model's latents, decoded batch by batch
            with torch.no_grad():
                images.append(decode(result.x.detach()).float().cpu())
        log_qs.append(result.log_q.cpu())
        kappas.append(result.kappa.cpu())
        calls += result.model_calls
    return torch.cat(xs), (torch.cat(images) if images else None), torch.cat(log_qs), torch.cat(kappas), calls


def _write(out: Path, samples, images, log_q, kappa) -> None:
    """.png: an image grid (of the decoded images, if any); .npz: x, log_q, kappa (and images [K, 3, H, W] in
    [0, 1]). Written to a temporary name and renamed."""
    import numpy as np

    from difflab.apps.figures import save_image_grid
    from difflab.core.io import atomic_path

    if out.suffix == ".png":
        save_image_grid(samples if images is None else images * 2 - 1, out)   # the grid takes [−1, 1]
        return
    arrays = {"x": samples.numpy(), "log_q": log_q.numpy(), "kappa": kappa.numpy()}
    if images is not None:
        arrays["images"] = images.numpy()
    with atomic_path(out) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
