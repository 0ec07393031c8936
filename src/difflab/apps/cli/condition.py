"""`difflab condition fit | run`: DEFT h-network fitting; DEFT / DPS / ΠGDM reconstruction (docs/methods/deft.md).

Every option is checked before any work (a specific DifflabError, which `difflab.apps.cli.app.main` turns into
one line and exit status 2); outputs are written atomically and never overwritten without --force.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from difflab.core.errors import ConfigError, ShapeError
from difflab.core.io import dumps_strict

app = typer.Typer(no_args_is_help=True, help="Inverse problems: DEFT (a small learned h-transform on a frozen "
                                             "model), DPS and ΠGDM.")

# after `app`: difflab.apps.cli.app imports this module's `app` to mount it, so importing this module first
# (which runs difflab.apps.cli.app) must find `app` already defined
from difflab.apps.cli.common import (  # noqa: E402
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


class Task(str, Enum):
    inpaint = "inpaint"
    superres = "superres"
    blur = "blur"
    hdr = "hdr"
    phase = "phase"
    ct = "ct"


class Method(str, Enum):
    deft = "deft"
    dps = "dps"
    pigdm = "pigdm"
    uncond = "uncond"


class HNet(str, Enum):
    unet = "unet"
    cunet = "cunet"


class MaskKind(str, Enum):
    box = "box"
    random = "random"
    strokes = "strokes"


# the task options shared by both commands
SIGMA_Y = typer.Option(0.05, min=1e-6, max=1e3, help="measurement noise std σ_y")
MASK = typer.Option(MaskKind.box, help="inpaint: box (right part hidden), random pixels, free-form strokes")
FRACTION = typer.Option(0.5, min=0.01, max=0.99, help="inpaint: the hidden fraction")
FACTOR = typer.Option(2, min=2, max=64, help="superres: the pooling factor (2 or 4)")
KERNEL_SIZE = typer.Option(5, min=1, max=255, help="blur: Gaussian kernel size (odd)")
KERNEL_STD = typer.Option(1.0, min=1e-3, max=1e3, help="blur: Gaussian kernel std (pixels)")
ANGLES = typer.Option(16, min=1, max=4096, help="ct: number of projection angles")
OVERSAMPLE = typer.Option(2, min=1, max=16, help="phase: FFT oversampling factor")
SIGMA_MIN = typer.Option(None, min=0.0, help="the lowest noise level σ used (default: the model's, within "
                         "[0.002, 80] for run); must lie in the model's range")
SIGMA_MAX = typer.Option(None, min=0.0, help="the highest noise level σ used (default: the model's, within "
                         "[0.002, 80] for run); must lie in the model's range")


def _operator(task: Task, shape, sigma_y, mask, fraction, factor, kernel_size, kernel_std, angles, oversample):
    from difflab.condition.reconstruct import make_operator

    operator = make_operator(task.value, tuple(shape), sigma_y=sigma_y, mask=mask.value, fraction=fraction,
                             factor=factor, kernel_size=kernel_size, kernel_std=kernel_std, angles=angles,
                             oversample=oversample)
    _check_operator_fits(operator, shape)
    return operator


def _check_operator_fits(operator, shape) -> None:
    import torch

    try:
        operator(torch.zeros((1, *shape)))
    except ShapeError as err:
        raise ShapeError(f"the {operator.name!r} task does not fit this model's data shape "
                         f"{tuple(shape)}: {err}") from err


def _load_base(model: Path, device: str):
    from difflab import load

    base = load(model, device=device)
    shape = getattr(base, "data_shape", None)
    if shape is None:
        raise ConfigError(f"{model} does not record its data shape; DEFT / DPS / ΠGDM need it")
    return base, tuple(shape)


@app.command()
@writes_output
def fit(
    model: Path = typer.Option(..., help="base model folder (kept frozen)"),
    task: Task = typer.Option(..., help="the measurement operator"),
    sigma_y: float = SIGMA_Y, mask: MaskKind = MASK, fraction: float = FRACTION, factor: int = FACTOR,
    kernel_size: int = KERNEL_SIZE, kernel_std: float = KERNEL_STD, angles: int = ANGLES, oversample: int = OVERSAMPLE,
    data: Optional[str] = typer.Option(None, help="data set of clean training images (default: the model's data "
                                       "set)"),
    pairs: int = typer.Option(1000, min=1, max=MAX_STEPS, help="clean training images (a fresh measurement y of "
                              "each at every step)"),
    train_steps: int = typer.Option(2000, min=1, max=MAX_STEPS, help="optimiser steps"),
    batch_size: int = typer.Option(64, min=1, max=MAX_BATCH, help="training batch (pairs per optimiser step)"),
    lr: float = typer.Option(1e-3, min=1e-8, max=10.0, help="Adam learning rate"),
    net: Optional[HNet] = typer.Option(None, help="network to train, for images: the h-network's NN1, a small U-Net "
                                       "(default) or cU-Net (ODE blocks); vectors always use an MLP"),
    out: Path = typer.Option(..., help="h-network folder to write (config.json + model.safetensors)"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="random seed of the fit (initial weights, batches)"),
    device: Device = DEVICE_OPTION,
    force: bool = typer.Option(False, help="overwrite an existing h-network folder"),
    resume: bool = RESUME_OPTION,
    checkpoint_every: Optional[int] = CHECKPOINT_EVERY_OPTION,
    sigma_min: Optional[float] = SIGMA_MIN,
    sigma_max: Optional[float] = SIGMA_MAX,
) -> None:
    """Fit a DEFT h-network for a frozen model and a task; saves it as an add-on naming both."""
    from difflab.condition.deft import DEFTConfig, fit_deft, parameter_fraction
    from difflab.data import TOY_DATASETS, model_dataset
    from difflab.sampling.grids import model_sigma_range

    check_output(out, force)
    dev = resolve_device(device)
    base, shape = _load_base(model, dev)
    model_sigma_range(base, sigma_min, sigma_max)     # a range leaving the model's: refuse before any work
    nn1_class = _nn1_class(net, shape)
    operator = _operator(task, shape, sigma_y, mask, fraction, factor, kernel_size, kernel_std, angles, oversample)
    data_name = data or getattr(base, "meta", {}).get("dataset")
    if not data_name:
        raise ConfigError(f"{model} does not name its data set; pass --data NAME_OR_FOLDER")
    # only the classes the model was trained on
    dataset = model_dataset(data_name, base, n=pairs if data_name in TOY_DATASETS else None, seed=seed)
    if tuple(dataset.shape) != shape:
        raise ShapeError(f"data {data_name!r} has per-sample shape {dataset.shape}, the model expects {shape}")
    if pairs > len(dataset):
        raise ConfigError(f"--pairs {pairs} exceeds the {len(dataset)} samples of {data_name!r}")
    overrides, resume_mode = fitting(checkpoint_every, resume, force)
    config = DEFTConfig(**overrides, train_steps=train_steps, batch_size=batch_size, lr=lr, seed=seed, device=dev,
                        nn1_class=nn1_class, sigma_min=sigma_min, sigma_max=sigma_max)
    result = fit_deft(base, operator, dataset.x[:pairs].to(dev), config=config,
                      out_dir=out.with_name(out.name + ".checkpoints"), progress=True, resume=resume_mode)
    hnet = result.model
    if result.is_main_process:
        hnet.save(out, overwrite=force)
        typer.echo(dumps_strict({"out": str(out), "task": task.value, "operator": operator.config() | {"mask": None},
                                 "train_steps": train_steps, "final_loss": result.final_loss,
                                 "hnet_fraction_of_base": round(parameter_fraction(hnet, base), 4)}))


def _nn1_class(net: HNet | None, shape: tuple[int, ...]) -> str | None:
    """The h-network's NN1 class for --net (None: the default, a U-Net for images, an MLP for vectors)."""
    if net is not None and len(shape) != 3:
        raise ConfigError(f"--net {net.value} needs image data [C, H, W]; this model's samples have shape {shape}")
    return None if net is None else {HNet.unet: "UNet", HNet.cunet: "CUNet"}[net]


@app.command()
@writes_output
def run(
    model: Path = typer.Option(..., help="base model folder"),
    method: Method = typer.Option(..., help="reconstruction method: deft (needs --hnet) | dps | pigdm | uncond "
                                  "(the floor)"),
    hnet: Optional[Path] = typer.Option(None, help="DEFT h-network folder (from `difflab condition fit`)"),
    task: Optional[Task] = typer.Option(None, help="the measurement operator (dps / pigdm; deft takes its "
                                        "h-network's)"),
    sigma_y: Optional[float] = typer.Option(None, min=1e-6, help="measurement noise std σ_y (default: the "
                                            "h-network's for deft, else 0.05)"),
    mask: MaskKind = MASK, fraction: float = FRACTION, factor: int = FACTOR,
    kernel_size: int = KERNEL_SIZE, kernel_std: float = KERNEL_STD, angles: int = ANGLES, oversample: int = OVERSAMPLE,
    solver: str = typer.Option("heun", help="solver: any of `difflab sample`"),
    nfe: int = typer.Option(19, min=1, max=10_000, help="model evaluations per reconstruction "
                            "(equal for every method)"),
    input: Optional[Path] = typer.Option(None, help=".npz with `y` [N, ...] (and `mask` for inpainting, "
                                         "optionally `truth`)"),
    simulate: Optional[int] = typer.Option(None, min=1, max=100_000, help="simulate N measurements of held-out data "
                                          "instead (at most 100,000: the toy sets are drawn in memory)"),
    zeta: float = typer.Option(0.3, min=1e-8, max=1e6, help="DPS step size ζ"),
    pigdm_weight: float = typer.Option(1.0, min=1e-8, max=1e6, help="ΠGDM's guidance weight (its w; not "
                                       "classifier-free guidance's --w)"),
    out: Path = typer.Option(..., help="file to write: .npz (x, y, truth) or .png (measurement | reconstruction | "
                             "truth)"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="reconstruction i uses seed SEED+i"),
    device: Device = DEVICE_OPTION,
    force: bool = typer.Option(False, help="overwrite an existing output file"),
    sigma_min: Optional[float] = SIGMA_MIN,
    sigma_max: Optional[float] = SIGMA_MAX,
) -> None:
    """Reconstruct from measurements with DEFT, DPS, ΠGDM (or the unconditional floor)."""
    from difflab.condition.deft import load_hnet
    from difflab.condition.operators import operator_from_config
    from difflab.condition.reconstruct import make_denoiser, psnr, reconstruct, ssim, summarise
    from difflab.condition.reconstruct import simulate as simulate_measurement
    from difflab.sampling import sigmas_for_nfe
    from difflab.sampling.grids import EDM_RANGE, model_sigma_range

    check_output(out, force, (".npz", ".png"))
    if (input is None) == (simulate is None):
        raise ConfigError("give exactly one of --input FILE and --simulate N")
    if method == Method.deft and hnet is None:
        raise ConfigError("--method deft needs --hnet DIR (fit one with `difflab condition fit`)")
    if method != Method.deft and hnet is not None:
        raise ConfigError(f"--hnet is only used by --method deft, not {method.value}")
    if method != Method.deft and task is None:
        raise ConfigError(f"--method {method.value} needs --task (the measurement operator)")
    if input is not None and not input.is_file():
        raise ConfigError(f"--input {input} does not exist")
    dev = resolve_device(device)
    sigmas_for_nfe(solver, nfe, "karras", to_zero=True)       # unknown solver / impossible NFE: fail now
    base, shape = _load_base(model, dev)
    sigma_min, sigma_max = model_sigma_range(base, sigma_min, sigma_max, default=EDM_RANGE)   # before any work
    h_network = None
    if method == Method.deft:
        h_network = load_hnet(hnet, base=base, device=dev)    # refuses an h-network of another model
        fitted = h_network.operator_config
        operator = operator_from_config({**fitted, "sigma_y": fitted["sigma_y"] if sigma_y is None else sigma_y})
        if task is not None and task.value != operator.name:
            raise ConfigError(f"--task {task.value} contradicts the h-network's operator {operator.name!r}")
    else:
        operator = _operator(task, shape, 0.05 if sigma_y is None else sigma_y, mask, fraction, factor, kernel_size,
                             kernel_std, angles, oversample)
    truth = None
    if simulate is not None:
        truth = _held_out(base, model, simulate, shape).to(dev)
        operator, y = simulate_measurement(operator, truth, seed)
    else:
        operator, y, truth = _read_input(input, operator, shape, dev)
    denoiser = make_denoiser(method.value, base, operator, h_network, zeta, pigdm_weight)
    x = reconstruct(denoiser, y, range(seed, seed + len(y)), shape, solver, nfe,
                    conditional=method != Method.uncond, sigma_min=sigma_min, sigma_max=sigma_max).cpu()
    summary = {"out": str(out), "method": method.value, "operator": operator.name, "n": len(x), "solver": solver,
               "nfe": nfe}
    if truth is not None and len(shape) == 3:
        summary |= {"psnr": summarise(psnr(x, truth.cpu())), "ssim": summarise(ssim(x, truth.cpu()))}
    _write(out, x, y.cpu(), None if truth is None else truth.cpu(), operator)
    typer.echo(dumps_strict(summary))


def _held_out(base, model: Path, n: int, shape):
    from difflab.data import TOY_DATASETS, model_dataset

    name = getattr(base, "meta", {}).get("dataset")
    if not name:
        raise ConfigError(f"{model} does not name its data set; --simulate needs held-out data (use --input)")
    # held-out samples of the classes the model was trained on
    toy = name in TOY_DATASETS
    dataset = model_dataset(name, base, n=n, seed=12345) if toy else model_dataset(name, base, split="test")
    if tuple(dataset.shape) != tuple(shape):
        raise ShapeError(f"data {name!r} has per-sample shape {dataset.shape}, the model expects {tuple(shape)}")
    if n > len(dataset):
        raise ConfigError(f"--simulate {n} exceeds the {len(dataset)} held-out samples of {name!r}")
    return dataset.x[:n]


def _read_input(path: Path, operator, shape, device):
    """(operator with the file's masks, y, truth or None) from an .npz written by numpy."""
    import numpy as np
    import torch

    from difflab.condition.operators import Inpaint

    try:
        with np.load(path, allow_pickle=False) as arrays:
            files = {k: torch.as_tensor(arrays[k], dtype=torch.float32) for k in arrays.files}
    except (OSError, ValueError) as err:
        raise ConfigError(f"--input {path} is not a readable .npz file ({err})") from err
    if "y" not in files:
        raise ConfigError(f"--input {path} has no array `y` (found {sorted(files)})")
    y = files["y"].to(device)
    if "mask" in files:
        if not isinstance(operator, Inpaint):
            raise ConfigError(f"--input has a `mask`, but the operator is {operator.name!r}, not inpaint")
        file_mask = files["mask"].to(device)
        if file_mask.shape != (len(y), *shape):
            raise ShapeError(f"`mask` must be [N, *shape] = [{len(y)}, {', '.join(map(str, shape))}], "
                             f"got {tuple(file_mask.shape)}")
        if operator.kind in ("box", "coords"):
            if not bool((file_mask == operator.mask.to(device)).all()):
                raise ConfigError("the file's mask differs from the fixed box mask the operator was built with")
        else:
            operator = Inpaint(file_mask, operator.sigma_y, operator.kind, operator.fraction, shape)
    expected = tuple(operator(torch.zeros((len(y), *shape), device=device)).shape)
    if tuple(y.shape) != expected:
        raise ShapeError(f"`y` has shape {tuple(y.shape)}; the {operator.name!r} operator measures {expected}")
    truth = files.get("truth")
    if truth is not None and tuple(truth.shape) != (len(y), *shape):
        raise ShapeError(f"`truth` must be [N, *shape] = [{len(y)}, {', '.join(map(str, shape))}]")
    return operator, y, truth


def _write(out: Path, x, y, truth, operator) -> None:
    import numpy as np

    from difflab.core.io import atomic_path

    if out.suffix == ".png":
        from difflab.apps.demo.condition import save_comparison

        if x.ndim != 4:
            raise ShapeError(f"a .png needs images, these reconstructions have shape {tuple(x.shape[1:])}; use .npz")
        columns = {"measurement": operator.image_input(y) if operator.image_like else None, "reconstruction": x,
                   "truth": truth}
        save_comparison({k: v for k, v in columns.items() if v is not None}, out)
        return
    arrays = {"x": x.numpy(), "y": y.numpy()} | ({} if truth is None else {"truth": truth.numpy()})
    if operator.mask is not None:
        arrays["mask"] = operator.mask.expand_as(x).cpu().numpy()
    with atomic_path(out) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
