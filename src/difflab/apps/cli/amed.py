"""`difflab amed fit`: an AMED predictor for a model, NFE and grid; `difflab amed grid`: a learned time grid."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import typer

from difflab.apps.cli.common import (
    CHECKPOINT_EVERY_OPTION,
    DEVICE_OPTION,
    MAX_BATCH,
    MAX_NFE,
    MAX_SEED,
    MAX_STEPS,
    RESUME_OPTION,
    Device,
    check_output,
    fail,
    fitting,
    progress_bar,
    resolve_device,
    writes_output,
)
from difflab.core.errors import NotImprovedWarning

app = typer.Typer(no_args_is_help=True, help="AMED: a tiny learned predictor for ~5-step sampling "
                                                  "(Zhou et al., CVPR 2024).")


@app.command("fit")
@writes_output
def amed_fit(
    model: Path = typer.Option(..., help="base model folder"),
    nfe: int = typer.Option(5, min=2, help="model evaluations to fit for (with AFS: 3, 5, 7, 9 ↔ 3, 4, 5, 6 grid "
                            "points)"),
    base_solver: str = typer.Option("dpm2", help="base solver the predictor drives: dpm2 (AMED-Solver), or "
                                    "AMED-Plugin on euler, ipndm, dpmpp_2m, dpmpp_3m, unipc"),
    grid: str = typer.Option("karras", help="σ grid family (the teacher solver uses the same family)"),
    grid_file: Optional[Path] = typer.Option(None, help="a learned grid folder (difflab.amed.grid_for_amed / fit_grid) "
                                             "with the levels this NFE needs: fit on its σ's instead of --grid"),
    teacher_solver: str = typer.Option("heun", help="teacher solver for the reference trajectories"),
    m: int = typer.Option(1, "--M", min=0, max=1000, help="extra teacher points per student interval (the teacher "
                          "must be more accurate than the student: M=1 is the paper's recipe, 3-7 is safer)"),
    trajectories: int = typer.Option(10_000, min=1, max=MAX_STEPS, help="teacher trajectories to fit on"),
    batch_size: int = typer.Option(128, min=1, max=MAX_BATCH, help="teacher trajectories per training batch"),
    out: Path = typer.Option(..., help="predictor folder to write"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="random seed of the fit (trajectories' noise, batches)"),
    device: Device = DEVICE_OPTION,
    force: bool = typer.Option(False, help="overwrite an existing predictor folder"),
    save_if_worse: bool = typer.Option(False, help="save the predictor even when it is **no better than its base "
                                       "solver** on held-out noise (it is then the base solver itself), or no "
                                       "better than the plain base solver spending the same NFE"),
    resume: bool = RESUME_OPTION,
    checkpoint_every: Optional[int] = CHECKPOINT_EVERY_OPTION,
) -> None:
    """Fit an AMED predictor for a model, NFE and grid; saves it as an add-on naming its base model."""
    from difflab import load
    from difflab.amed.fit import AMEDConfig, fit_amed
    from difflab.amed.grids import load_grid
    from difflab.amed.plugin import check_base

    check_output(out, force)
    check_base(base_solver)
    dev = resolve_device(device)
    denoiser = load(model, device=dev)
    learned = None if grid_file is None else load_grid(grid_file, base_model=denoiser)   # refused for another model
    overrides, resume_mode = fitting(checkpoint_every, resume, force)
    config = AMEDConfig(**overrides, nfe=nfe, grid=grid, teacher_solver=teacher_solver, M=m, trajectories=trajectories,
                        base_solver=base_solver, batch_size=batch_size, seed=seed, device=dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotImprovedWarning)     # said below, in one line
        result = fit_amed(denoiser, config, out_dir=out.with_name(out.name + ".checkpoints"), resume=resume_mode,
                          progress=True, grid=learned)
    errors = {k: v for k, v in result.metrics.items() if k.startswith("heldout_error_")}
    base, fitted = errors["heldout_error_base"], errors["heldout_error_fitted"]
    plain = errors.get("heldout_error_plain", float("inf"))
    if fitted >= plain and not save_if_worse:     # the plain solver is the better thing to use: say that first
        fail(f"the fitted predictor ({fitted:.4g}) is no better than plain {config.base_solver} spending the same "
             f"{nfe} evaluations ({plain:.4g}, held-out endpoint error); not saved: sample with --solver "
             f"{config.base_solver} --nfe {nfe}{' --afs' if config.afs else ''}, or pass --save-if-worse to save "
             "it anyway")
    if fitted >= base and not save_if_worse:
        fail(f"the fitted predictor is no better than its base solver {config.base_solver} on held-out noise "
             f"(endpoint error {base:.4g}); not saved: try a larger --M or more --trajectories, "
             "or pass --save-if-worse to save it anyway")
    result.model.save(out, overwrite=force)
    typer.echo(json.dumps({"out": str(out), "nfe": nfe, "grid": grid if learned is None else str(grid_file),
                           "parameters": sum(p.numel() for p in result.model.parameters()), **errors}))


@app.command("grid")
@writes_output
def amed_grid(
    model: Path = typer.Option(..., help="base model folder"),
    solver: str = typer.Option("ipndm", help="the deterministic solver the grid is for (LD3: euler, heun, dpm2, "
                               "ipndm, ipndm_v, dpmpp_2m, dpmpp_3m)"),
    nfe: int = typer.Option(5, min=1, max=MAX_NFE, help="model evaluations the solver spends on the grid"),
    method: str = typer.Option("ld3", "--grid-method", help="the grid optimiser: gits (dynamic programming over a "
                               "fine teacher grid), ld3 (backpropagation through the solver) or ays (Align Your "
                               "Steps' KL bound)"),
    afs: bool = typer.Option(False, help="analytical first step (saves one evaluation; often best at NFE 3-5)"),
    fine_levels: int = typer.Option(100, min=3, max=MAX_STEPS, help="the teacher's levels (GITS's fine grid)"),
    train_steps: int = typer.Option(300, min=1, max=MAX_STEPS, help="LD3's optimiser steps (Adam)"),
    n_fit: int = typer.Option(64, min=1, max=MAX_BATCH, help="the noise draws to fit on"),
    n_eval: int = typer.Option(256, min=1, max=MAX_BATCH, help="the held-out noise draws of the never-worse check"),
    out: Path = typer.Option(..., help="grid folder to write"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="seed of the noise draws (held out: seed + 1)"),
    device: Device = DEVICE_OPTION,
    force: bool = typer.Option(False, help="overwrite an existing grid folder"),
    save_if_worse: bool = typer.Option(False, help="save a grid that is no better than its base (Karras ρ = 7) "
                                       "on held-out noise (it then holds Karras' grid)"),
) -> None:
    """Fit a time grid for a model, solver and NFE (GITS / LD3 / AYS); saves it as an add-on naming its base model.

    Use it with `difflab sample --grid-file OUT`, `difflab amed fit --grid-file OUT` or
    `DifflabScheduler.from_grid`. Every fit is checked against Karras ρ = 7 on held-out noise."""
    from difflab import load
    from difflab.amed.grids import GridConfig, fit_grid, grid_points

    check_output(out, force)
    grid_points(solver, nfe, afs)                                 # an unknown solver or impossible NFE: refused now
    dev = resolve_device(device)
    denoiser = load(model, device=dev)
    config = GridConfig(afs=afs, fine_levels=fine_levels, train_steps=train_steps, n_fit=n_fit, n_eval=n_eval,
                        seed=seed, log_every=max(1, train_steps // 100))
    with progress_bar(f"fitting a {method} grid ({solver}, NFE {nfe})", train_steps if method == "ld3" else 1,
                      True) as advance, warnings.catch_warnings():
        warnings.simplefilter("ignore", NotImprovedWarning)        # said below, in one line
        result = fit_grid(denoiser, solver, nfe, method, config, callback=lambda step: advance(config.log_every))
        advance(0 if method == "ld3" else 1)
    grid = result.model
    base, learned = grid.metrics["base_error"], grid.metrics["learned_error"]
    if not grid.improved and not save_if_worse:
        fail(f"the {method} grid is no better than Karras on held-out noise (endpoint error {learned:.4g} vs "
             f"{base:.4g}); not saved: try more --n-fit, --fine-levels or --train-steps, another --grid-method, "
             "or pass --save-if-worse to save Karras' grid under this name")
    grid.save(out, overwrite=force)
    typer.echo(json.dumps({"out": str(out), "method": method, "solver": solver, "nfe": nfe, "afs": afs,
                           "sigmas": [round(float(s), 6) for s in grid.sigmas], "improved": grid.improved,
                           "heldout_error_karras": base, "heldout_error_learned": learned,
                           "seconds": round(result.timings["total"], 2)}))
