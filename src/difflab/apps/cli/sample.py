"""`difflab sample`: any model, any solver, an exact NFE budget; .npz streamed to disk or a .png grid."""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from difflab.apps.cli.common import (
    DEVICE_OPTION,
    MAX_NFE,
    Device,
    check_output,
    progress_bar,
    resolve_device,
    writes_output,
)
from difflab.core.errors import ConfigError

PNG_MAX_SAMPLES = 256     # a 16 x 16 grid
STEP_SEED_OFFSET = 2**40  # stochastic solvers' per-step noise for sample i comes from seed SEED+i+2^40
ROW_BLOCK = 8             # the model sees whole blocks of 8 rows (see run_batch)


@writes_output
def sample(
    model: Path = typer.Option(..., help="model folder (difflab or diffusers; a distilled student too)"),
    solver: str = typer.Option("heun", help="solver: euler | heun | dpm2 | dpmpp_2m | dpmpp_3m | ipndm | ipndm_v | "
                               "ab_variable | unipc | deis | euler_maruyama | amed (with --predictor)"),
    nfe: Optional[int] = typer.Option(None, min=1, max=MAX_NFE, help="model evaluations to spend; the grid is built "
                                      "to spend exactly this (default 35; with --solver amed, the predictor's; a "
                                      "distilled student spends one per step: default, the steps it was distilled "
                                      "for)"),
    grid: str = typer.Option("karras", help="σ grid family: karras | logsnr | time_uniform | time_quadratic | "
                             "discrete"),
    grid_file: Optional[Path] = typer.Option(None, help="a learned grid folder (difflab.amed.fit_grid: GITS / "
                                             "LD3): sample on its σ's with its solver, NFE and AFS setting "
                                             "(replaces --grid; --to-zero does not apply)"),
    afs: bool = typer.Option(False, "--afs", help="analytical first step: replace the first evaluation by "
                             "x/sqrt(1+σ²) (saves one evaluation)"),
    to_zero: bool = typer.Option(True, help="end the grid with σ = 0 (a last Euler step to the denoised sample, "
                                 "as in EDM: Heun at 35 NFE = 18 steps)"),
    predictor: Optional[Path] = typer.Option(None, help="AMED predictor folder (from `difflab amed fit`)"),
    w: Optional[float] = typer.Option(None, help="a distilled student (`difflab distill`): the classifier-free "
                                      "guidance weight w it is conditioned on (default 0)"),
    stochastic: bool = typer.Option(False, "--stochastic", help="a distilled student: the stochastic sampler "
                                    "(two steps down, one back up; same NFE)"),
    n: int = typer.Option(64, min=1, help="number of samples (.npz: streamed to disk a batch at a time, so memory "
                          f"does not grow with N; .png: at most {PNG_MAX_SAMPLES})"),
    seed: int = typer.Option(0, min=0, help="sample i uses seed SEED+i, whatever the batch size or process count"),
    batch_size: int = typer.Option(256, min=1, help="sampling batch: samples per model call and per write to disk"),
    class_label: Optional[int] = typer.Option(None, "--class", min=-1, max=2**31 - 1,
                                              help="class label for a conditional model (-1: the null class)"),
    out: Path = typer.Option(..., help="file to write: .npz (array `x`) or .png (image grid)"),
    device: Device = DEVICE_OPTION,
    force: bool = typer.Option(False, help="overwrite an existing output file"),
) -> None:
    """Sample a model with a solver at an exact NFE budget; writes .npz or a .png grid.

    Runs unchanged under `accelerate launch --num_processes N difflab sample ...`: process r takes
    batches r, r+N, r+2N, ... of the same batches a single process would run, and the main process
    writes them in order, so the output is the same whatever N.
    """
    import torch

    from difflab import load

    check_output(out, force, (".npz", ".png"))
    if (solver == "amed") != (predictor is not None):
        raise ConfigError("--solver amed needs --predictor DIR, and --predictor needs --solver amed")
    if out.suffix == ".png" and n > PNG_MAX_SAMPLES:
        raise ConfigError(f"a .png grid shows at most {PNG_MAX_SAMPLES} samples, --n {n} was given; "
                          "write .npz for more")
    if seed + n + ROW_BLOCK + STEP_SEED_OFFSET >= 2**64:
        raise ConfigError(f"--seed {seed} with --n {n} gives seeds beyond 2^64 - 2^40; use a smaller seed")
    rank, processes, gather, dev = _processes(resolve_device(device))
    denoiser = load(model, device=dev)
    data_shape = getattr(denoiser, "data_shape", None)
    if data_shape is None:
        raise ConfigError(f"{model} does not record its data shape; cannot draw noise for it")
    if out.suffix == ".png" and len(data_shape) != 3:
        raise ConfigError(f"a .png grid needs image data, this model's samples have shape {tuple(data_shape)}")
    _check_disk_space(out, n, data_shape)
    class_label = _check_class_label(denoiser, class_label)
    from difflab.distill.student import GuidedStudent

    student = isinstance(denoiser, GuidedStudent)
    if student:
        run = _student_runner(denoiser, nfe, 0.0 if w is None else w, stochastic, class_label, predictor)
        class_label = None                                   # the student runner conditions itself
    elif w is not None or stochastic:
        raise ConfigError("--w and --stochastic are for distilled students (difflab distill); this model "
                          "takes --solver and --nfe")
    elif grid_file is not None:
        run = _grid_file_runner(denoiser, grid_file, solver, nfe)
        solver = run.solver
    else:
        run = (_amed_runner(denoiser, predictor, nfe, dev) if solver == "amed"
               else _solver_runner(denoiser, solver, 35 if nfe is None else nfe, grid, afs, to_zero))
    batch_size = min(batch_size, n)
    batches = [range(seed + start, seed + min(n, start + batch_size)) for start in range(0, n, batch_size)]

    def run_batch(seeds: range):
        # whole blocks of ROW_BLOCK rows (the extra rows are the next seeds, dropped): BLAS takes a different
        # path for a remainder of rows, so this keeps sample i bit-identical for every --batch-size
        padded = range(seeds.start, seeds.start + -(-len(seeds) // ROW_BLOCK) * ROW_BLOCK)
        cond = {} if class_label is None else {"class_labels": torch.full((len(padded),), class_label, device=dev)}
        return run(padded, data_shape, dev, cond)[:len(seeds)].to(torch.float32)

    main_process = rank == 0
    with torch.no_grad(), _sample_writer(out, n, data_shape, main_process) as write, \
            progress_bar("sampling", len(batches), main_process) as advance:
        for group in _round_robin(batches, rank, processes, run_batch, gather, (batch_size, *data_shape), dev):
            for rows in group:
                write(rows)
            advance(len(group))
    if main_process:
        typer.echo(json.dumps({"out": str(out), "n": n, "solver": "student" if student else solver, "nfe": run.nfe,
                               "points": run.points, "processes": processes}))


def _student_runner(student, nfe: int | None, w: float, stochastic: bool, class_label: int | None,
                    predictor: Path | None):
    """A batch sampler for a distilled guided student (one model evaluation per step, so --nfe is its step
    count): sample i from seed i, whatever the batch."""

    from difflab.distill.samplers import sample_student

    if predictor is not None:
        raise ConfigError("--predictor is for --solver amed; a distilled student samples itself (--nfe, --w)")
    if not math.isfinite(w):
        raise ConfigError(f"--w must be finite, got {w}")
    if nfe is not None and student.steps is not None and nfe != student.steps:
        raise ConfigError(f"this student was distilled for {student.steps} steps (one model evaluation each): "
                          f"use --nfe {student.steps}, or the round folder OUT.rounds/steps-{nfe:04d} of "
                          f"`difflab distill progressive` for --nfe {nfe}")
    steps = student.steps if nfe is None else nfe
    if steps is None:
        raise ConfigError("this student (stage 1, `difflab distill guided`) was not distilled for a step count: "
                          "pass --nfe N (one model evaluation per step)")

    def run(seeds, shape, device, cond):
        return sample_student(student, len(seeds), steps, w, class_label, stochastic, seed=seeds.start, device=device,
                              batch_size=len(seeds))

    run.nfe, run.points = steps, steps + 1
    return run


def _processes(device: str):
    """(rank, number of processes, gather, device): one process, or the group `accelerate launch` made."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None, device
    from accelerate import PartialState
    from accelerate.utils import gather

    state = PartialState(cpu=device == "cpu")
    return state.process_index, state.num_processes, gather, (device if device == "cpu" else str(state.device))


def _round_robin(batches: list, rank: int, processes: int, run_batch, gather, padded_shape: tuple, device: str):
    """Yield, round by round, the outputs of batches [k·P, (k+1)·P) in order (on every process).

    Process r runs batch k·P + r of each round; a batch is the same seeds, in the same batch shape,
    as in a single-process run, so the samples do not depend on P. Rows are padded to the batch
    size so that every process contributes one tensor of one shape to the gather.
    """
    import torch

    for first in range(0, len(batches), processes):
        group = batches[first:first + processes]
        if processes == 1:
            yield [run_batch(group[0]).cpu()]
            continue
        mine = run_batch(group[rank]) if rank < len(group) else None
        padded = torch.zeros(padded_shape, dtype=torch.float32, device=device)
        if mine is not None:
            padded[:len(mine)] = mine
        every = gather(padded).cpu().reshape(processes, *padded_shape)
        yield [every[r, :len(seeds)] for r, seeds in enumerate(group)]


def _check_class_label(denoiser, label: int | None) -> int | None:
    """The label to condition on (None: unconditional), refused before work if the model has no such class."""
    from difflab.data import model_class_list

    if label is None:
        return None
    labels = getattr(denoiser, "labels", None)          # a GaussianMixture: one label per component
    if labels is not None:
        classes = sorted({int(c) for c in labels.tolist() if c >= 0})
    else:
        counts = [m.num_classes for m in getattr(denoiser, "modules", lambda: [])() if hasattr(m, "num_classes")]
        if not counts:
            return label                                # unknown: the model itself checks
        classes = model_class_list(denoiser, counts[0])  # less any it never saw (train --keep-classes)
    if label == -1:
        return -1 if classes else None                  # the null class; nothing to drop for an unconditional model
    if label not in classes:
        shown = classes if len(classes) <= 12 else f"{classes[0]}..{classes[-1]}"
        raise ConfigError(f"--class {label}: " + (f"this model's classes are {shown}" if classes
                                                  else "this model is unconditional; drop --class"))
    return label


def _check_disk_space(out: Path, n: int, data_shape) -> None:
    """Refuse an .npz that cannot fit on its disk before sampling (float32 samples)."""
    import shutil

    if out.suffix != ".npz":
        return
    needed = 4 * n * math.prod(data_shape)
    folder = next(p for p in (out.resolve().parent, *out.resolve().parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ConfigError(f"--n {n} samples of shape {tuple(data_shape)} need {needed / 2**30:.3g} GiB, "
                          f"{folder} has {free / 2**30:.3g} GiB free; ask for fewer samples")


def _solver_runner(denoiser, solver: str, nfe: int, grid: str, afs: bool, to_zero: bool):
    """A batch sampler for a registered solver on the grid that spends exactly `nfe`."""
    from difflab.sampling import PerSampleGenerator, seeded_noise, sigmas_for_nfe
    from difflab.sampling import sample as run_sample
    from difflab.sampling.grids import EDM_RANGE, model_sigma_range

    sigma_min, sigma_max = model_sigma_range(denoiser, default=EDM_RANGE)
    sigmas = sigmas_for_nfe(solver, nfe, grid, sigma_min, sigma_max, afs=afs, to_zero=to_zero)

    def run(seeds, shape, device, cond):
        x = seeded_noise(seeds, shape, float(sigmas[0]), device=device)
        # a stochastic solver's per-step noise comes from seeds disjoint from the initial noise's
        generator = PerSampleGenerator([s + STEP_SEED_OFFSET for s in seeds])
        return run_sample(denoiser, x, sigmas, solver=solver, generator=generator, afs=afs, **cond)

    run.nfe, run.points = nfe, len(sigmas)
    return run


def _grid_file_runner(denoiser, grid_file: Path, solver: str, nfe: int | None):
    """A batch sampler on a learned grid (refused for another base model, a different --nfe or --solver amed)."""
    from difflab.amed.grids import load_grid
    from difflab.sampling import sample as run_sample
    from difflab.sampling import seeded_noise

    if solver == "amed":
        raise ConfigError("--grid-file runs the grid's own solver; --solver amed takes --predictor instead")
    grid = load_grid(grid_file, base_model=denoiser)
    if nfe is not None and nfe != grid.nfe:
        raise ConfigError(f"this grid was fitted for NFE {grid.nfe} with {grid.solver}; use --nfe {grid.nfe} or fit "
                          f"one for NFE {nfe}")
    sigmas = grid.sigmas

    def run(seeds, shape, device, cond):
        x = seeded_noise(seeds, shape, float(sigmas[0]), device=device)
        return run_sample(denoiser, x, sigmas.to(device), solver=grid.solver, afs=grid.afs, **cond)

    run.nfe, run.points, run.solver = grid.nfe, len(sigmas), grid.solver
    return run


def _amed_runner(denoiser, predictor_dir: Path, nfe: int | None, device: str):
    """A batch sampler for AMED-Solver / AMED-Plugin with a fitted predictor (refused for another model or NFE)."""
    from difflab.amed.plugin import amed_sample
    from difflab.amed.predictor import check_predictor, load_predictor, predictor_sigmas
    from difflab.sampling import seeded_noise
    from difflab.sampling.guards import finite_guard

    predictor = load_predictor(predictor_dir, base_model=denoiser, nfe=nfe, device=device)
    sigmas = predictor_sigmas(predictor)
    afs = predictor.fitted_for.get("afs", True)
    check_predictor(predictor, denoiser, sigmas, afs)

    def run(seeds, shape, device, cond):
        x = seeded_noise(seeds, shape, float(sigmas[0]), device=device)
        return amed_sample(denoiser, x, sigmas, predictor, afs=afs, check=False,
                           callback=finite_guard("amed", sigmas), **cond)

    run.nfe, run.points = predictor.nfe, len(sigmas)
    return run


@contextmanager
def _sample_writer(out: Path, n: int, data_shape, main_process: bool):
    """`write(rows)` for the samples in order: .npz streamed to disk; .png kept (<= PNG_MAX_SAMPLES) and
    drawn at the end. The file appears only if every sample was written; other processes write nothing."""
    import torch

    from difflab.apps.figures import save_image_grid
    from difflab.core.io import npz_rows

    if not main_process:
        yield lambda rows: None
    elif out.suffix == ".npz":
        with npz_rows(out, n, data_shape) as rows:
            yield rows.write
    else:
        kept = []
        yield kept.append
        save_image_grid(torch.cat(kept), out)
