"""Benchmark: few-step ODE solvers (difflab and diffusers), AMED-Solver and AMED-Plugin against the exact ODE solution.

For three models (the default 2-D Gaussian mixture, a 64-D Gaussian mixture, the digits U-Net of
the demo recipe) every solver starts from the same initial noise and runs down the Karras grid
(ρ = 7) from σ = 80 to σ = 0.002 spending exactly NFE ∈ {3, 4, 5, 6, 8, 10} model evaluations;
the error is the mean over samples of ‖x_solver − x_ref‖₂ at σ_min, where x_ref is the ODE
solution from the same noise (mixtures: Heun, 2,000 steps, float64, exact denoiser; digits: Heun,
1,000 steps). No final step to σ = 0: every solver ends at σ_min like the reference.

Rows: every deterministic entry of `difflab.sampling.SOLVERS` (with AFS also on where it changes
the parity of the NFE a solver can spend: heun and dpm2), AMED-Solver and AMED-Plugin (on ipndm,
dpmpp_2m and, for the mixtures, unipc) with a predictor fitted by `fit_amed` for each odd NFE in the
list (MIXTURE_AMED / DIGITS_AMED name the rows), and diffusers' DPMSolverMultistep (dpmsolver++ 2M),
UniPCMultistep (bh2), EulerDiscrete and HeunDiscrete schedulers on the same model (wrapped as an
ε-prediction VP model) and the same σ's. Combinations a solver cannot spend exactly are "n/a".

Also: the bookkeeping overhead of a sampling loop at NFE 10 on the digits model (wall time over
NFE × one model call), and the Fréchet distance of 1,000 digits at NFE 5 (best training-free
solver, AMED, reference).

Prints one markdown table per model, writes benchmarks/results/solvers.json and
benchmarks/results/solvers_error_vs_nfe.png.

    OMP_NUM_THREADS=2 python benchmarks/solvers.py [--quick] [--out-dir DIR] [--cache DIR]

--quick (~1 minute): fewer samples and trajectories, shorter references, a 100-step digits model,
no Fréchet distance. The digits model is trained once (demo recipe) and cached under --cache.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from difflab.amed.fit import AMEDConfig, fit_amed
from difflab.amed.plugin import amed_plugin, amed_sample
from difflab.amed.predictor import predictor_sigmas
from difflab.apps.demo.run import DIGITS_BATCH, DIGITS_STEPS, DIGITS_UNET, cached_model
from difflab.core.denoiser import eps
from difflab.core.errors import ConfigError
from difflab.core.mixture import GaussianMixture
from difflab.data import default_gmm, load_digits
from difflab.metrics import mean_l2
from difflab.sampling import SOLVERS, get_sigmas, sample, seeded_noise, sigmas_for_nfe
from difflab.train.denoiser import DenoiserConfig

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
NFES = (3, 4, 5, 6, 8, 10)
AMED_NFES = tuple(n for n in (3, 5, 7, 9) if n in NFES)   # AMED-Solver with AFS spends odd NFEs
DIFFUSERS = ("diffusers_dpmpp_2m", "diffusers_unipc_bh2", "diffusers_euler", "diffusers_heun")
# the difflab solver each diffusers scheduler implements (used for the grid and the agreement check)
DIFFUSERS_TWIN = {"diffusers_dpmpp_2m": "dpmpp_2m", "diffusers_unipc_bh2": "unipc", "diffusers_euler": "euler",
                  "diffusers_heun": "heun"}
ROOT = Path(__file__).resolve().parent.parent
# AMED rows per model: AMED-Solver with the recipe's teacher (M=1) and a finer one, and AMED-Plugin on the
# best multistep bases with a teacher accurate enough to learn from (Heun on (M+1)(N−1)+1 points)
MIXTURE_AMED = (("amed", "dpm2", 1), ("amed_M3", "dpm2", 3), ("amed_plugin_ipndm", "ipndm", 7),
                ("amed_plugin_dpmpp_2m", "dpmpp_2m", 7), ("amed_plugin_unipc", "unipc", 7))
DIGITS_AMED = (("amed", "dpm2", 1), ("amed_plugin_ipndm", "ipndm", 3), ("amed_plugin_dpmpp_2m", "dpmpp_2m", 3))


# ----- models --------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    denoiser: torch.nn.Module
    shape: tuple[int, ...]
    n_samples: int
    dtype: torch.dtype
    reference_steps: int
    amed_trajectories: int
    amed_batch: int
    # AMED rows: (row, base solver, teacher Heun's M); ('amed', 'dpm2', 1) is AMED-Solver's recipe
    # (docs/methods/amed.md (10))
    amed_variants: tuple[tuple[str, str, int], ...] = (("amed", "dpm2", 1),)
    info: dict = field(default_factory=dict)


def mixture_64d(seed: int = 0, dim: int = 64, components: int = 10) -> GaussianMixture:
    """10 isotropic Gaussians in 64-D: means N(0, 0.6²), stds U(0.2, 0.5), weights U(0.5, 1.5) (fixed seed).

    Per-coordinate data std ≈ sqrt(0.6² + E[std²]) ≈ 0.7.
    """
    g = torch.Generator().manual_seed(seed)
    means = 0.6 * torch.randn(components, dim, generator=g, dtype=torch.float64)
    stds = 0.2 + 0.3 * torch.rand(components, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
    return GaussianMixture(means, stds, weights)


def digits_model(cache: Path, steps: int, seed: int = 0):
    """The demo's digits U-Net (difflab.apps.demo.run recipe), trained once and cached in `cache`."""
    from difflab.nets import UNet
    from difflab.train.denoiser import train_denoiser

    def train():
        config = DenoiserConfig(train_steps=steps, lr=2e-3, seed=seed, device="cpu", checkpoint_every=steps,
                                batch_size=DIGITS_BATCH, dataset="digits")
        return train_denoiser(UNet(**DIGITS_UNET), load_digits("train").x, config=config, progress=False).model

    denoiser, seconds = cached_model(cache, train)
    return denoiser.eval().requires_grad_(False), seconds


# ----- running solvers -------------------------------------------------------------------------------
class CallCounter:
    """Counts a denoiser's forward calls with a hook (the denoiser itself is untouched, so AMED's
    base-model check still recognises it)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        module.register_forward_hook(lambda *_: self._hit())

    def _hit(self):
        self.calls += 1


def deterministic_rows() -> list[tuple[str, str, bool]]:
    """(row label, solver, afs): every deterministic solver; AFS on too where it changes the NFE parity."""
    rows = []
    for name, spec in SOLVERS.items():
        if spec.stochastic:
            continue
        rows.append((name, name, False))
        parities = {afs: {spec.nfe(n, False, afs) % 2 for n in range(2, 12)} for afs in (False, True)}
        if parities[True] != parities[False]:
            rows.append((f"{name}+afs", name, True))
    return rows


def make_scheduler(kind: str):
    import diffusers

    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  prediction_type="epsilon")
    if kind == "diffusers_dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                                     solver_type="midpoint", lower_order_final=True)
    if kind == "diffusers_unipc_bh2":   # order 3 (UniP-3 + UniC), as difflab's unipc default
        return diffusers.UniPCMultistepScheduler(**common, solver_order=3, solver_type="bh2", predict_x0=True,
                                                 lower_order_final=True)
    if kind == "diffusers_euler":
        return diffusers.EulerDiscreteScheduler(**common)
    if kind == "diffusers_heun":
        return diffusers.HeunDiscreteScheduler(**common)
    raise ValueError(kind)


def set_grid(scheduler, kind: str, grid: Tensor) -> tuple[int, bool]:
    """Give `scheduler` the σ grid (N points, ending at σ_min). Returns (steps to run, state is x_vp).

    Euler: the public `set_timesteps(sigmas=...)` (the last entry is the final σ). DPM-Solver++ and
    UniPC take no custom σ's for a VP model in diffusers 0.42 (UniPC's `sigmas=` needs flow sigmas),
    and Heun takes none: `set_timesteps(n)` builds their step structure, then `scheduler.sigmas`
    is replaced by the grid (Heun: in its interleaved layout, followed by the σ = 0 it always
    appends, whose final Euler step is not taken). Their step functions read σ only from
    `scheduler.sigmas`; the timesteps are only used to find the step index (begin index 0 here).
    """
    n = len(grid)
    g32 = grid.to(torch.float32)
    if kind == "diffusers_euler":
        scheduler.set_timesteps(sigmas=g32.tolist())
        steps, vp_state = n - 1, False
    elif kind == "diffusers_heun":
        scheduler.set_timesteps(num_inference_steps=n)
        s = torch.cat([g32, g32.new_zeros(1)])
        scheduler.sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
        steps, vp_state = 2 * (n - 1), False                  # stop before diffusers' Euler step to σ = 0
    else:
        scheduler.set_timesteps(num_inference_steps=n - 1)
        assert len(scheduler.sigmas) == n and len(scheduler.timesteps) == n - 1
        scheduler.sigmas = g32.clone()
        steps, vp_state = n - 1, True
    scheduler.set_begin_index(0)
    return steps, vp_state


def diffusers_sample(kind: str, denoiser, x: Tensor, grid: Tensor, scheduler=None) -> Tensor:
    """Sample with a diffusers scheduler from x_σ at grid[0] to grid[-1]; returns x_σ at grid[-1].

    The model is `denoiser` wrapped as an ε-prediction VP model: ε̂(x_vp; σ) = ε̂_σ(x_vp·sqrt(1 + σ²); σ),
    evaluated at the σ the scheduler is at (scheduler.sigmas[k] on step k for all four schedulers).
    """
    scheduler = scheduler or make_scheduler(kind)
    steps, vp_state = set_grid(scheduler, kind, grid)
    sigmas = scheduler.sigmas.double()
    state = x / math.sqrt(1 + float(sigmas[0]) ** 2) if vp_state else x
    for k in range(steps):
        t = scheduler.timesteps[k]
        sigma = float(sigmas[k])
        x_vp = state if vp_state else scheduler.scale_model_input(state, t)
        model_output = eps(denoiser, x_vp * math.sqrt(1 + sigma**2), sigma)
        state = scheduler.step(model_output, t, state).prev_sample
    return state * math.sqrt(1 + float(grid[-1]) ** 2) if vp_state else state


# ----- one model ---------------------------------------------------------------------------------------
def run_case(case: Case, log: Callable[[str], None]) -> dict:
    denoiser = case.denoiser
    counter = CallCounter(denoiser)
    seeds = range(case.n_samples)
    x0 = seeded_noise(seeds, case.shape, SIGMA_MAX, dtype=case.dtype)
    out: dict = {"n_samples": case.n_samples, "dtype": str(case.dtype).replace("torch.", ""),
                 "data_shape": list(case.shape), **case.info}

    start = time.perf_counter()
    with torch.no_grad():
        ref = sample(denoiser, x0, get_sigmas("karras", case.reference_steps + 1, SIGMA_MIN, SIGMA_MAX, RHO), "heun")
    out["reference"] = {"solver": "heun", "steps": case.reference_steps, "nfe": 2 * case.reference_steps,
                        "seconds": round(time.perf_counter() - start, 2),
                        "mean_norm": round(float(ref.double().flatten(1).norm(dim=1).mean()), 4)}
    if case.dtype == torch.float64:   # an estimate of the reference's own error: vs half the steps
        with torch.no_grad():
            half = sample(denoiser, x0, get_sigmas("karras", case.reference_steps // 2 + 1, SIGMA_MIN, SIGMA_MAX,
                                                   RHO), "heun")
        out["reference"]["l2_vs_half_steps"] = mean_l2(half, ref)   # ≈ 3× its error (2nd order)
    log(f"  reference: Heun {case.reference_steps} steps, {out['reference']['seconds']} s")

    errors: dict[str, dict[str, float | str]] = {}
    nfe_measured: dict[str, dict[str, int]] = {}
    finals: dict[tuple[str, int], Tensor] = {}
    start = time.perf_counter()
    for label, solver, afs in deterministic_rows():
        errors[label], nfe_measured[label] = {}, {}
        for nfe in NFES:
            try:
                grid = sigmas_for_nfe(solver, nfe, "karras", SIGMA_MIN, SIGMA_MAX, RHO, afs=afs)
            except ConfigError:
                errors[label][str(nfe)] = "n/a"
                continue
            counter.calls = 0
            with torch.no_grad():
                x = sample(denoiser, x0, grid, solver, afs=afs)
            nfe_measured[label][str(nfe)] = counter.calls
            errors[label][str(nfe)] = mean_l2(x, ref)
            finals[(label, nfe)] = x
    out["difflab_seconds"] = round(time.perf_counter() - start, 2)
    log(f"  difflab solvers: {out['difflab_seconds']} s")

    start = time.perf_counter()
    agreement: dict[str, float] = {}
    for kind in DIFFUSERS:
        twin = DIFFUSERS_TWIN[kind]
        errors[kind], nfe_measured[kind] = {}, {}
        for nfe in NFES:
            try:
                grid = sigmas_for_nfe(twin, nfe, "karras", SIGMA_MIN, SIGMA_MAX, RHO)
            except ConfigError:
                errors[kind][str(nfe)] = "n/a"
                continue
            counter.calls = 0
            with torch.no_grad():
                x = diffusers_sample(kind, denoiser, x0, grid)
            nfe_measured[kind][str(nfe)] = counter.calls
            errors[kind][str(nfe)] = mean_l2(x, ref)
            if (twin, nfe) in finals:   # same method, same grid: the two libraries should agree
                mine = finals[(twin, nfe)]
                rel = float((x.double() - mine.double()).abs().max() / mine.double().abs().max())
                agreement[kind] = max(agreement.get(kind, 0.0), rel)
    out["diffusers_seconds"] = round(time.perf_counter() - start, 2)
    out["diffusers_vs_difflab_twin_max_rel_diff"] = {k: float(f"{v:.3g}") for k, v in agreement.items()}
    log(f"  diffusers schedulers: {out['diffusers_seconds']} s; max relative difference to the difflab twin: "
        + ", ".join(f"{k} {v:.2g}" for k, v in agreement.items()))

    amed: dict[str, dict] = {}
    predictors = {}
    for row, base, M in case.amed_variants:
        errors[row], nfe_measured[row], amed[row] = {str(n): "n/a" for n in NFES}, {}, {}
        for nfe in AMED_NFES:
            start = time.perf_counter()
            config = AMEDConfig(nfe=nfe, grid="karras", sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                                teacher_solver="heun", M=M, trajectories=case.amed_trajectories,
                                batch_size=case.amed_batch, rho=RHO,
                                dtype=str(case.dtype).replace("torch.", ""), base_solver=base)
            result = fit_amed(denoiser, config, shape=case.shape)
            predictor = result.model
            fit_seconds = time.perf_counter() - start
            predictors[(row, nfe)] = predictor
            grid = predictor_sigmas(predictor)
            counter.calls = 0
            with torch.no_grad():
                x = amed_plugin(denoiser, x0, grid, predictor, base=base)
            nfe_measured[row][str(nfe)] = counter.calls
            errors[row][str(nfe)] = mean_l2(x, ref)
            amed[row][str(nfe)] = {
                "fit_seconds": round(fit_seconds, 2), "trajectories": case.amed_trajectories,
                "batch_size": case.amed_batch,
                "adam_steps": math.ceil(case.amed_trajectories / case.amed_batch) * (len(grid) - 1),
                "final_loss": float(f"{result.final_loss:.4g}") if result.history else None,
                "grid_points": len(grid), "base_solver": base,
                "teacher": f"heun on {(M + 1) * (len(grid) - 1) + 1} points (M={M})"}
            log(f"  {row} NFE {nfe}: fitted in {fit_seconds:.1f} s ({case.amed_trajectories} trajectories)")
        amed[row]["fit_seconds_total"] = round(sum(v["fit_seconds"] for v in amed[row].values()), 2)
    out["amed"] = amed
    out["errors"] = errors
    out["nfe_measured"] = nfe_measured
    mismatched = {row: {k: v for k, v in counts.items() if int(k) != v} for row, counts in nfe_measured.items()}
    out["nfe_mismatches"] = {row: v for row, v in mismatched.items() if v}

    # the AMED ratio at NFE 5 against the best training-free solver of either library
    free = {row: e["5"] for row, e in errors.items() if not row.startswith("amed") and isinstance(e.get("5"), float)}
    best = min(free, key=free.get)
    out["best_training_free_nfe5"] = {"solver": best, "error": free[best]}
    out["amed_over_best_training_free_nfe5"] = {row: errors[row]["5"] / free[best] for row in amed
                                                if isinstance(errors[row].get("5"), float)}
    out["_finals"] = finals           # removed before writing
    out["_predictors"] = predictors
    out["_ref"] = ref
    return out


# ----- digits extras ---------------------------------------------------------------------------------
def overhead(denoiser, repeats: int, batch: int = 256, nfe: int = 10) -> dict:
    """Sampling wall time at NFE 10 over NFE × one model call on the same batch (medians, interleaved)."""
    x0 = seeded_noise(range(batch), (1, 8, 8), SIGMA_MAX)
    sigma_mid = torch.full((batch,), 1.0)
    grids = {s: sigmas_for_nfe(s, nfe, "karras", SIGMA_MIN, SIGMA_MAX, RHO) for s in ("dpmpp_2m", "ipndm", "unipc")}
    grid_diffusers = grids["dpmpp_2m"]
    times: dict[str, list[float]] = {k: [] for k in ("model_call", *grids, "diffusers_dpmpp_2m")}
    with torch.no_grad():
        for _ in range(2):                       # warm-up
            denoiser(x0 / SIGMA_MAX, sigma_mid)
            sample(denoiser, x0, grids["dpmpp_2m"], "dpmpp_2m")
        for _ in range(repeats):
            for _ in range(3):
                start = time.perf_counter()
                denoiser(x0 / SIGMA_MAX, sigma_mid)
                times["model_call"].append(time.perf_counter() - start)
            for solver, grid in grids.items():
                start = time.perf_counter()
                sample(denoiser, x0, grid, solver)
                times[solver].append(time.perf_counter() - start)
            scheduler = make_scheduler("diffusers_dpmpp_2m")
            start = time.perf_counter()
            diffusers_sample("diffusers_dpmpp_2m", denoiser, x0, grid_diffusers, scheduler)
            times["diffusers_dpmpp_2m"].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    call = median["model_call"]
    return {"batch": batch, "nfe": nfe, "repeats": repeats, "model_call_ms": round(1e3 * call, 2),
            "sampling_ms": {k: round(1e3 * v, 1) for k, v in median.items() if k != "model_call"},
            "ratio": {k: round(v / (nfe * call), 3) for k, v in median.items() if k != "model_call"},
            "definition": "median sampling wall time / (NFE × median wall time of one model call on the same "
                          "batch); difflab via difflab.sample (incl. its grid check and per-step finiteness "
                          "guard); diffusers: set_timesteps + grid + its step loop around the same VP-wrapped "
                          "model (scheduler construction excluded)"}


def frechet(case_out: dict, denoiser, n: int, reference_points: int) -> dict:
    """Fréchet distance (digit-classifier features) of n digits at NFE 5: best training-free, AMED, reference."""
    from difflab.metrics import digits_frechet, digits_frechet_floor

    best = case_out["best_training_free_nfe5"]["solver"]
    x0 = seeded_noise(range(n), (1, 8, 8), SIGMA_MAX)
    result = {"n": n, "floor": round(digits_frechet_floor(n), 2)}
    with torch.no_grad():
        if best in DIFFUSERS:
            x = diffusers_sample(best, denoiser, x0, sigmas_for_nfe(DIFFUSERS_TWIN[best], 5, "karras", SIGMA_MIN,
                                                                   SIGMA_MAX, RHO))
        else:
            solver, afs = best.replace("+afs", ""), best.endswith("+afs")
            x = sample(denoiser, x0, sigmas_for_nfe(solver, 5, "karras", SIGMA_MIN, SIGMA_MAX, RHO, afs=afs), solver,
                       afs=afs)
        result[f"best_training_free ({best}, NFE 5)"] = round(digits_frechet(x), 2)
        for (row, nfe), predictor in case_out["_predictors"].items():
            if nfe == 5:
                x = amed_sample(denoiser, x0, predictor_sigmas(predictor), predictor)
                result[f"{row} (NFE 5)"] = round(digits_frechet(x), 2)
        start = time.perf_counter()
        x = sample(denoiser, x0, get_sigmas("karras", reference_points, SIGMA_MIN, SIGMA_MAX, RHO), "heun")
        seconds = time.perf_counter() - start
        result[f"reference proxy (heun, {reference_points - 1} steps)"] = round(digits_frechet(x), 2)
    # the proxy against the 1,000-step reference on the samples they share (the same seeds)
    ref = case_out["_ref"]
    result["reference_proxy_l2_vs_reference"] = mean_l2(x[: len(ref)], ref)
    result["reference_proxy_seconds"] = round(seconds, 1)
    return result


# ----- output ------------------------------------------------------------------------------------------
def fmt(v) -> str:
    return v if isinstance(v, str) else f"{v:.3g}"


def table(name: str, errors: dict) -> str:
    lines = [f"### {name}: mean L2 error at σ_min vs the reference", "",
             "| solver | " + " | ".join(f"NFE {n}" for n in NFES) + " |", "|---|" + "---:|" * len(NFES)]
    for row, cells in errors.items():
        lines.append(f"| {row} | " + " | ".join(fmt(cells.get(str(n), "n/a")) for n in NFES) + " |")
    return "\n".join(lines)


def figure(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 5.2), squeeze=False)
    rows = list(dict.fromkeys(row for res in results.values() for row in res["errors"]))
    palette = list(plt.get_cmap("tab10").colors) + ["navy", "lime", "maroon", "teal"]
    colour = {}
    for row in rows:   # a diffusers row takes its difflab twin's colour (dashed, open markers)
        if row.startswith("diffusers"):
            colour[row] = colour.get(DIFFUSERS_TWIN[row], "gray")
        elif row.startswith("amed"):
            colour[row] = {"amed": "black", "amed_M3": "dimgray"}.get(row, palette[len(colour) % len(palette)])
        else:
            colour[row] = palette[len([c for c in colour if not c.startswith(("diffusers", "amed"))]) % len(palette)]
    handles = {}
    for ax, name in zip(axes[0], names):
        for row in rows:
            cells = results[name]["errors"].get(row, {})
            pts = [(n, cells[str(n)]) for n in NFES if isinstance(cells.get(str(n)), float)]
            if not pts:
                continue
            if row.startswith("amed"):
                style = dict(lw=2.6, ls=":" if row == "amed_M3" else "-" if row == "amed" else "-.", marker="*", ms=12)
            elif row.startswith("diffusers"):
                style = dict(lw=1.2, ls="--", marker="o", ms=8, mfc="none", mew=1.3)
            else:
                style = dict(lw=1.4, ls="-", marker=".", ms=6)
            (line,) = ax.plot(*zip(*pts), label=row, color=colour[row], **style)
            handles.setdefault(row, line)
        ax.set_yscale("log")
        ax.set_xticks(NFES)
        ax.set_xlabel("NFE")
        ax.set_ylabel("mean L2 error vs reference at σ_min")
        ax.set_title(f"{name} ({results[name]['n_samples']} samples)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend([handles[r] for r in rows if r in handles], [r for r in rows if r in handles], fontsize=7,
                       loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Few-step ODE solvers: error vs NFE (Karras ρ=7, σ 80 → 0.002, no final zero step)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~1-minute run (smaller everything, no Fréchet)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench",
                        help="where the digits model is cached (reused if present)")
    parser.add_argument("--no-frechet", action="store_true", help="skip the Fréchet-distance comparison")
    args = parser.parse_args()
    wall_start = time.perf_counter()
    load_start = os.getloadavg()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    quick = args.quick
    mixture_n, mixture_ref, mixture_traj = (256, 500, 1024) if quick else (512, 2000, 4096)
    digits_steps = 100 if quick else DIGITS_STEPS
    digits_n, digits_ref, digits_traj, digits_batch = (64, 200, 256, 32) if quick else (256, 1000, 3072, 32)

    log(f"digits model ({digits_steps} steps, cached in {args.cache})")
    digits, train_seconds = digits_model(args.cache / ("digits" if digits_steps == DIGITS_STEPS
                                                       else f"digits-{digits_steps}"), digits_steps)
    gmm64 = mixture_64d()
    data64 = gmm64.sample(20_000, generator=torch.Generator().manual_seed(1))
    cases = [
        Case("gmm2d", default_gmm(), (2,), mixture_n, torch.float64, mixture_ref, mixture_traj, 32, MIXTURE_AMED,
             {"model": "difflab.data.default_gmm(): 8 isotropic Gaussians (std 0.2) on a circle of radius 2",
              "data_std": round(float(default_gmm().sample(20_000, generator=torch.Generator().manual_seed(1))
                                      .std()), 3)}),
        Case("gmm64d", gmm64, (64,), mixture_n, torch.float64, mixture_ref, mixture_traj, 32, MIXTURE_AMED,
             {"model": "10 isotropic Gaussians in 64-D, means 0.6·N(0, I), stds U(0.2, 0.5), weights U(0.5, 1.5), "
                       "seed 0 (benchmarks/solvers.py: mixture_64d)", "data_std": round(float(data64.std()), 3)}),
        Case("digits", digits, (1, 8, 8), digits_n, torch.float32, digits_ref, digits_traj, digits_batch, DIGITS_AMED,
             {"model": f"digits U-Net {DIGITS_UNET}, demo recipe ({digits_steps} steps, batch {DIGITS_BATCH}, "
                       "lr 2e-3, seed 0)", "train_seconds": round(train_seconds, 1),
              "parameters": sum(p.numel() for p in digits.parameters())}),
    ]
    results = {}
    for case in cases:
        log(f"[{case.name}]")
        start = time.perf_counter()
        results[case.name] = run_case(case, log)
        results[case.name]["seconds"] = round(time.perf_counter() - start, 1)

    log("[overhead]")
    over = overhead(digits, repeats=3 if quick else 5, batch=digits_n if quick else 256)
    notes = [
        "σ grid: Karras ρ=7 from 80 to 0.002, the grid from difflab.sampling.sigmas_for_nfe for each solver and NFE "
        "(n/a where it refuses); AMED uses its predictor's own grid (the same Karras family, N = 3, 4 points for "
        "NFE 3, 5 with AFS). No final σ=0 step anywhere.",
        "AFS variants are included only where AFS changes the parity of the NFE a solver can spend (heun, dpm2: "
        "2 evaluations per step, odd NFE only with AFS); the one-evaluation-per-step solvers with AFS are not rows.",
        "diffusers: the model is wrapped as an ε-prediction VP model (x_vp = x/sqrt(1+σ²), ε̂ evaluated at the σ the "
        "scheduler is at), ᾱ table = linear β 1e-4..0.02, 1000 steps (only used for the unused timestep values). "
        "EulerDiscreteScheduler gets the grid through set_timesteps(sigmas=...). DPMSolverMultistepScheduler, "
        "UniPCMultistepScheduler and HeunDiscreteScheduler accept no arbitrary σ grid for a VP model in diffusers "
        "0.42 (DPM-Solver: integer timesteps only, whose σ's lie in the table's [0.01, 157], so neither 80 nor "
        "0.002 can be hit; UniPC: sigmas= only with use_flow_sigmas; Heun: timesteps only), and "
        "use_karras_sigmas=True would take σ_min/σ_max from the table (0.01/157) and end with a repeated σ_min or a "
        "σ=0 step: so set_timesteps(n) builds their step structure and scheduler.sigmas is then replaced by the "
        "same grid (their step functions read σ only from scheduler.sigmas; begin index 0). HeunDiscrete always "
        "appends σ=0 with a final Euler step; that step is not taken, so it ends at σ_min after 2(N−1) "
        "evaluations (even NFE only, odd NFE n/a). The agreement of each scheduler with its difflab twin on the "
        "same grid is recorded per model (diffusers_vs_difflab_twin_max_rel_diff, max |Δx| / max |x|).",
        "diffusers UniPC runs with solver_order=3 (difflab unipc's default order), bh2, predict_x0, "
        "lower_order_final; DPM-Solver++ 2M with the midpoint solver type, lower_order_final.",
        "AMED predictors: difflab.amed.fit.fit_amed with its defaults (AFS, Adam lr 5e-3, teacher Heun on "
        "(M+1)(N-1)+1 points with M=1, the docs/methods/amed.md (10) recipe), one predictor per NFE, batch 32. "
        "Row 'amed' is "
        "that recipe; row 'amed_M3' (mixtures only; the digits fit budget of 2 minutes has no room for it) uses a "
        "finer teacher (M=3), because with M=1 the teacher itself (Heun on 5 or 7 points) is far from the exact "
        "ODE solution. The mixtures expose no bottleneck feature, so their predictors are learned per-step "
        "constants; the digits predictor reads the U-Net's bottleneck.",
    ]
    report = {"benchmark": "solvers", "quick": quick, "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "machine": platform.processor() or platform.machine(), "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
              "diffusers": __import__("diffusers").__version__,
              "settings": {"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "rho": RHO, "grid": "karras",
                           "nfes": list(NFES), "amed_nfes": list(AMED_NFES),
                           "error": "mean over samples of ||x_solver - x_ref||_2 at sigma_min"},
              "models": results, "overhead": over, "notes": notes}

    budget_ok = not quick and not args.no_frechet
    if budget_ok:
        log("[frechet]")
        start = time.perf_counter()
        report["frechet_nfe5"] = frechet(results["digits"], digits, 1000, reference_points=33)
        report["frechet_nfe5"]["seconds"] = round(time.perf_counter() - start, 1)
        notes.append("Fréchet distance: 1,000 digits (seeds 0..999) at NFE 5; the reference there is a proxy, "
                     "Heun with 32 steps (NFE 64), since the 1,000-step reference for 1,000 samples does not fit "
                     "the time budget; its L2 distance to the 1,000-step reference on the 256 shared seeds is "
                     "recorded (reference_proxy_l2_vs_reference).")
    else:
        notes.append("Fréchet distance omitted (--quick or --no-frechet).")

    # tables
    lines = []
    for name, res in results.items():
        lines.append(table(name, res["errors"]))
        best = res["best_training_free_nfe5"]
        ratios = res["amed_over_best_training_free_nfe5"]
        lines.append("")
        lines.append(f"**{name}**: at NFE 5, AMED error / best training-free error ({best['solver']}, "
                     f"{best['error']:.3g}) = " + ", ".join(f"{v:.3g} ({row})" for row, v in ratios.items()))
        lines.append("")
    lines.append("### Bookkeeping overhead at NFE 10 (digits U-Net, batch "
                 f"{over['batch']}; one model call {over['model_call_ms']} ms)")
    lines.append("")
    lines.append("| loop | sampling ms | ratio to NFE × model call |")
    lines.append("|---|---:|---:|")
    for k, v in over["ratio"].items():
        lines.append(f"| {k} | {over['sampling_ms'][k]} | {v} |")
    lines.append("")
    lines.append("AMED fitting wall time (s): " + "; ".join(
        f"{name} {row} " + ", ".join(f"NFE {n}: {v['fit_seconds']}" for n, v in fits.items() if n in map(str, NFES))
        for name, res in results.items() for row, fits in res["amed"].items()))
    if "frechet_nfe5" in report:
        lines.append("")
        lines.append("Fréchet distance, 1,000 digits: " + ", ".join(
            f"{k} {v}" for k, v in report["frechet_nfe5"].items()
            if k not in ("n", "reference_proxy_seconds", "seconds")))
    print("\n".join(lines))

    for res in results.values():
        for key in [k for k in res if k.startswith("_")]:
            del res[key]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if quick else ""
    figure(results, args.out_dir / f"solvers{suffix}_error_vs_nfe.png")
    report["figure"] = f"solvers{suffix}_error_vs_nfe.png"
    report["wall_seconds"] = round(time.perf_counter() - wall_start, 1)
    # 1-minute load averages: well above torch_threads means another process shared the cores
    report["loadavg_1min"] = {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)}
    (args.out_dir / f"solvers{suffix}.json").write_text(json.dumps(report, indent=2))
    log(f"wall time {report['wall_seconds']} s")


if __name__ == "__main__":
    main()
