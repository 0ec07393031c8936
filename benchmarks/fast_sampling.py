"""Benchmark: fast sampling beyond AMED: training-free solvers, learned grids (GITS, LD3, AYS), AMED, grid + AMED.

One record per (dataset, method, NFE): {"dataset", "method", "nfe", "error", "fd", "fit_seconds"}. `error` is the
mean L2 distance at σ_min = 0.002 to the ODE solution from the same noise (mixtures: Heun on a Karras grid of 1,000
steps (500 with --quick), float64, the exact denoiser; networks: Heun, 1,000 steps (100 with --quick)); `fd` the
Fréchet distance to the test split in the data set's classifier features (`difflab.metrics.frechet`) over the same
samples as `error` (networks, full run only; None otherwise; the real-data floor at that n is logged). Every
method starts from σ_max = 80 and spends exactly `nfe` evaluations.

Methods: each training-free solver with and without AFS (`ipndm+afs`, ...) on Karras ρ = 7; each learned grid for
iPNDM (`gits`, `ld3`, `ays`); AMED-Plugin on iPNDM (`amed_plugin`) and AMED-Solver (`amed_solver`) on Karras, and
`ld3+amed` (the plugin on an LD3 grid fitted for it, `difflab.amed.grid_for_amed`). AMED spends odd NFEs with AFS
and even ones without. Datasets: 2-, 16-, 64-D Gaussian mixtures, the digits U-Net of benchmarks/solvers.py (cached
under runs/bench), and "mnist": the class-conditional `full` bench model in --runs (benchmarks/mnist_models.py),
called without a label (its null-class, unconditional denoiser); skipped with one line when it is not there.

Prints a table per dataset and the ratio best learned / best training-free per NFE; writes
benchmarks/results/fast_sampling[_quick].json and fast_sampling[_quick].png (error vs NFE per method, log scale).
A run on some data sets (--datasets) or NFEs (--nfes) replaces those records of an existing results file and keeps
the others, so data sets can run in separate processes (one core each).

    OMP_NUM_THREADS=1 python benchmarks/fast_sampling.py [--quick] [--datasets gmm2d,digits] [--runs DIR]

Full run on 2 shared cores, one process per core (the fits are cut to fit: see FULL): the mixtures 11 minutes,
digits 36 (10 of them its reference), MNIST about 80 per process with its NFEs split over two (--nfes 3,5,8 and
4,6,10). --quick (about 3 minutes): NFE 3, 5, 8 on the mixtures D = 2 and 64, NFE 5 on digits (AYS and
AMED-Plugin only); fewer solvers and small fits; MNIST (with --runs runs/bench/mnist-quick) is a smoke test.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from filelock import FileLock
from torch import Tensor

from difflab.amed import AMEDConfig, GridConfig, amed_sample, fit_amed, fit_grid, grid_for_amed, predictor_sigmas
from difflab.apps.demo.run import DIGITS_STEPS
from difflab.core.errors import ConfigError, NotImprovedWarning
from difflab.core.fingerprint import fingerprint
from difflab.core.io import atomic_path
from difflab.data import default_gmm
from difflab.metrics import mean_l2
from difflab.sampling import get_sigmas, sample, seeded_noise, sigmas_for_nfe

sys.path.insert(0, str(Path(__file__).parent))
from _kept import kept_tensors  # noqa: E402
from _mnist import load_bench_models, missing_bench_models  # noqa: E402
from solvers import digits_model, mixture_64d  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
ROOT = Path(__file__).resolve().parent.parent
REFERENCES = ROOT / "runs" / "bench" / "fast_sampling"   # cached network references (one per model, noise, steps)
MNIST_MODEL = "full"                       # class-conditional, used unconditionally (the null class)
NETWORKS = ("digits", "mnist")             # scored by Fréchet distance too (full run)
GRID_SOLVER = "ipndm"                      # the learned grids' solver and AMED-Plugin's base
FULL = {"nfes": (3, 4, 5, 6, 8, 10), "datasets": ("gmm2d", "gmm16d", "gmm64d", "digits", "mnist"),
        "solvers": ("euler", "heun", "dpm2", "ipndm", "ipndm_v", "dpmpp_2m", "dpmpp_3m", "unipc", "deis"),
        "grids": ("gits", "ld3", "ays"), "n": 512, "fd": True,
        # LD3 also for the best training-free base at few steps (iPNDM-v with AFS), as a user would fit it
        "grids_on_best_base": (("ld3", "ipndm_v", True),),
        # cut to fit ~40 minutes on 2 shared cores (AYS at the KLUB defaults alone took 89 s per fit on the 64-D
        # mixture): 1024 AMED trajectories, LD3 200 steps, a 60-level teacher, a smaller KLUB search
        "trajectories": 1024, "ld3_steps": 200, "fine_levels": 60,
        "klub": {"klub_nodes": 4, "klub_repeats": 2, "klub_rounds": 3, "klub_candidates": 6},
        # the digits U-Net costs ~0.45 s per 512 samples: 256 samples (FD needs more than its 128 features),
        # a 32-level teacher of 2 Heun substeps, the quick KLUB search, 256 AMED trajectories
        "digits": {"n": 256, "fine_levels": 32, "teacher_substeps": 2, "ld3_steps": 60, "trajectories": 256,
                   "n_eval": 32, "klub": {"klub_nodes": 4, "klub_repeats": 1, "klub_rounds": 2, "klub_candidates": 4}},
        # MNIST's U-Net: ~130 sample-evaluations/s on one core: 256 samples (FD over 128 features), a reference of
        # 200 Heun steps (its own error, Richardson's estimate from 100 steps, is logged), the quick KLUB search
        "mnist": {"n": 256, "ref_steps": 200, "fine_levels": 24, "teacher_substeps": 2, "ld3_steps": 40,
                  "trajectories": 128, "n_fit": 16, "n_eval": 16,
                  "klub": {"klub_nodes": 4, "klub_repeats": 1, "klub_rounds": 2, "klub_candidates": 4}}}
QUICK = {"nfes": (3, 5, 8), "datasets": ("gmm2d", "gmm64d", "digits", "mnist"),
         "solvers": ("euler", "ipndm", "dpmpp_2m", "unipc"), "grids": ("ld3", "ays"), "n": 128,
         "trajectories": 256, "ld3_steps": 40, "fine_levels": 24, "fd": False,
         "klub": {"klub_nodes": 4, "klub_repeats": 1, "klub_rounds": 2, "klub_candidates": 4},
         # the U-Net costs ~100x a mixture call: one NFE, the cheapest fits
         "digits": {"nfes": (5,), "grids": ("ays",), "amed": ("amed_plugin",), "n": 64},
         # MNIST's U-Net: ~40 samples/s on the shared cores; a smoke test of the path
         "mnist": {"nfes": (5,), "grids": ("ays",), "amed": ("amed_plugin",), "n": 8, "ref_steps": 20,
                   "fine_levels": 8, "trajectories": 16, "n_fit": 8, "n_eval": 8}}


def datasets(names: tuple[str, ...], quick: bool, runs: Path, log) -> dict:
    """name -> (denoiser, shape, dtype, reference Heun steps); a missing MNIST model is skipped with one line."""
    cases = {}
    for name in names:
        if name.startswith("gmm"):
            dim = int(name[3:-1])
            model = default_gmm() if dim == 2 else mixture_64d(dim=dim)
            cases[name] = (model, (dim,), torch.float64, 500 if quick else 1000)
        elif name == "digits":
            steps = 100 if quick else DIGITS_STEPS
            folder = "digits" if steps == DIGITS_STEPS else f"digits-{steps}"
            model, _ = digits_model(ROOT / "runs" / "bench" / folder, steps)
            cases[name] = (model, (1, 8, 8), torch.float32, 100 if quick else 1000)
        elif name == "mnist":
            if missing_bench_models(runs, (MNIST_MODEL,)):
                log(f"mnist: skipped: no model in {runs}/{MNIST_MODEL}/model; run `make bench-models` "
                    "(or `python benchmarks/mnist_models.py --quick` and pass --runs runs/bench/mnist-quick)")
                continue
            # the class-conditional model called without a label: its null-class (unconditional) denoiser
            model = load_bench_models(runs, (MNIST_MODEL,))[MNIST_MODEL].requires_grad_(False)
            cases[name] = (model, tuple(model.data_shape), torch.float32, 100 if quick else 1000)
        else:
            raise SystemExit(f"unknown dataset {name!r}; choose from {', '.join(FULL['datasets'])}")
    return cases


def training_free(model, x: Tensor, solvers, nfe: int) -> list[tuple[str, Tensor, float]]:
    """(method, samples [B, ...], fit seconds 0) for each solver with and without AFS that spends exactly nfe."""
    rows = []
    for solver in solvers:
        for afs in (False, True):
            try:
                sigmas = sigmas_for_nfe(solver, nfe, "karras", SIGMA_MIN, SIGMA_MAX, afs=afs)
            except ConfigError:
                continue                                         # this solver cannot spend exactly nfe
            with torch.no_grad():
                out = sample(model, x, sigmas.to(x.dtype), solver=solver, afs=afs)
            rows.append((solver + ("+afs" if afs else ""), out, 0.0))
    return rows


def learned(model, shape, dtype, x: Tensor, nfe: int, spec: dict) -> list[tuple[str, Tensor, float]]:
    """(method, samples [B, ...], fit seconds) for each learned grid and AMED variant in spec."""
    rows = []
    n_fit, n_eval = spec.get("n_fit", 32), spec.get("n_eval", 64)
    grid_config = GridConfig(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, fine_levels=spec["fine_levels"], n_fit=n_fit,
                             n_eval=n_eval, teacher_substeps=spec.get("teacher_substeps", 4),
                             train_steps=spec["ld3_steps"], log_every=spec["ld3_steps"], **spec["klub"])
    fits = [(method, method, GRID_SOLVER, False) for method in spec["grids"]]
    fits += [(f"{method}/{solver}{'+afs' if afs else ''}", method, solver, afs)
             for method, solver, afs in spec.get("grids_on_best_base", ())]
    for row, method, solver, afs in fits:
        tic = time.perf_counter()
        try:
            grid = fit_grid(model, solver, nfe, method, dataclasses.replace(grid_config, afs=afs)).model
        except ConfigError:
            continue                                             # this solver cannot spend exactly nfe
        with torch.no_grad():
            out = sample(model, x, grid.check(model).to(x.dtype), solver=solver, afs=afs)
        rows.append((row, out, time.perf_counter() - tic))
    afs = nfe % 2 == 1                                           # AMED: odd NFEs with AFS, even ones without
    amed = AMEDConfig(nfe=nfe, afs=afs, M=7 if dtype == torch.float64 else 3, trajectories=spec["trajectories"],
                      batch_size=min(64, spec["trajectories"]), heldout=n_eval, sigma_min=SIGMA_MIN,
                      sigma_max=SIGMA_MAX, dtype="float64" if dtype == torch.float64 else "float32")
    for row, base, grid_method in (("amed_plugin", GRID_SOLVER, None), ("amed_solver", "dpm2", None),
                                   ("ld3+amed", GRID_SOLVER, "ld3")):
        if row not in spec.get("amed", (row,)):
            continue
        tic = time.perf_counter()
        config = AMEDConfig(**{**amed.to_dict(), "base_solver": base})
        grid = grid_for_amed(model, config, grid_method, grid_config).model if grid_method else None
        predictor = fit_amed(model, config, shape=shape, grid=grid).model
        with torch.no_grad():
            out = amed_sample(model, x, predictor_sigmas(predictor).to(x.dtype), predictor)
        rows.append((row, out, time.perf_counter() - tic))
    return rows


def fd_scorer(name: str, spec: dict, log):
    """samples [B, 1, S, S] -> Fréchet distance to the test split (networks in the full run), else None."""
    if name not in NETWORKS or not spec["fd"]:
        return lambda samples: None
    from difflab.metrics import frechet, frechet_floor, get_classifier

    classifier = get_classifier(name)
    log(f"  {name}: Fréchet distance over the {spec['n']} samples of the error; real-data floor at that n "
        f"{frechet_floor(name, spec['n'], classifier):.2f}")
    return lambda samples: frechet(name, samples.float(), classifier=classifier)


def heun_reference(model, x: Tensor, steps: int) -> Tensor:
    """Heun on a Karras grid of `steps` steps from x at σ_max to σ_min: the reference endpoint, [B, ...]."""
    with torch.no_grad():
        return sample(model, x, get_sigmas("karras", steps + 1, SIGMA_MIN, SIGMA_MAX).to(x.dtype), solver="heun")


def reference(name: str, model, x: Tensor, steps: int, log) -> Tensor:
    """The reference endpoints of x [B, ...]; for networks cached in runs/bench/fast_sampling (keyed by the model's
    fingerprint, the noise and the steps), so that NFEs run in separate processes share one reference."""
    tic = time.perf_counter()
    if name not in NETWORKS:
        ref = heun_reference(model, x, steps)
    else:
        path = REFERENCES / f"ref-{name}-{fingerprint(model)[:16]}-{len(x)}-{steps}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        def make() -> dict:
            ref = heun_reference(model, x, steps)
            # the reference's own error: Richardson's estimate from half the steps (Heun is 2nd order), 16 samples
            own_error = mean_l2(heun_reference(model, x[:16], steps // 2), ref[:16]) / 3
            log(f"  {name}: reference's own error ≈ {own_error:.3g} (from {steps // 2} steps)")
            return {"ref": ref, "x": x}

        with FileLock(str(path) + ".lock"):
            cached = kept_tensors(path, make)
            if not torch.equal(cached["x"], x):
                raise SystemExit(f"{path} was made from other noise; delete it")
            ref = cached["ref"]
    log(f"  {name}: reference (Heun, {steps} steps, {len(x)} samples) {time.perf_counter() - tic:.1f} s")
    return ref


def run_dataset(name: str, case, spec: dict, log):
    """Yields the records of each NFE in turn (so that a long run keeps what it has finished)."""
    model, shape, dtype, ref_steps = case
    spec = {**spec, **spec.get(name, {})}                        # per-dataset overrides (networks)
    x = seeded_noise(range(spec["n"]), shape, SIGMA_MAX).to(dtype)
    ref = reference(name, model, x, spec.get("ref_steps", ref_steps), log)
    fd = fd_scorer(name, spec, log)
    for nfe in spec["nfes"]:
        tic = time.perf_counter()
        rows = training_free(model, x, spec["solvers"], nfe) + learned(model, shape, dtype, x, nfe, spec)
        yield [{"dataset": name, "method": method, "nfe": nfe, "error": mean_l2(out, ref), "fd": fd(out),
                "fit_seconds": seconds} for method, out, seconds in rows]
        log(f"  {name} NFE {nfe}: {len(rows)} methods, {time.perf_counter() - tic:.1f} s")


def merged(path: Path, records: list[dict], run: dict) -> tuple[list[dict], list[dict]]:
    """The records of an earlier results file at `path` for the (dataset, NFE) pairs not run now, then these; and
    the runs that produced them (a run per invocation: its data sets, seconds and settings)."""
    if not path.is_file():
        return records, [run]
    earlier = json.loads(path.read_text())
    done = {(r["dataset"], r["nfe"]) for r in records}
    kept = [r for r in earlier.get("records", []) if (r["dataset"], r["nfe"]) not in done]
    runs = [old for old in earlier.get("runs", []) if old.get("id") != run["id"] and any(
        r["dataset"] in old["datasets"] and r["nfe"] in old.get("nfes", [r["nfe"]]) for r in kept)]
    return kept + records, runs + [run]


def ratios(records: list[dict]) -> dict:
    """(dataset, nfe) -> best learned / best training-free error (the issue's goals: ≤ 0.33 at NFE 3–5, ≤ 0.8 at
    6–10, never > 1)."""
    out = {}
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        for nfe in dict.fromkeys(r["nfe"] for r in records if r["dataset"] == dataset):
            rows = [r for r in records if r["dataset"] == dataset and r["nfe"] == nfe]
            free = min((r for r in rows if r["fit_seconds"] == 0.0), key=lambda r: r["error"])
            best = min((r for r in rows if r["fit_seconds"] > 0.0), key=lambda r: r["error"])
            ratio, goal = best["error"] / free["error"], 0.33 if nfe <= 5 else 0.8
            out[f"{dataset}/{nfe}"] = {"ratio": ratio, "goal": goal, "met": ratio <= goal,
                                       "best_learned": best["method"], "learned_error": best["error"],
                                       "best_training_free": free["method"], "training_free_error": free["error"]}
    return out


def table(records: list[dict], dataset: str) -> str:
    rows = [r for r in records if r["dataset"] == dataset]
    nfes = list(dict.fromkeys(r["nfe"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"### {dataset}: mean L2 error at σ_min vs the reference", "",
             "| method | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for method in methods:
        cells = {r["nfe"]: f"{r['error']:.3g}" for r in rows if r["method"] == method}
        lines.append(f"| {method} | " + " | ".join(cells.get(n, "n/a") for n in nfes) + " |")
    return "\n".join(lines)


def figure(records: list[dict], path: Path) -> None:
    """Error vs NFE, one panel per data set (FULL's order), one line per method: learned methods solid and bold,
    training-free solvers dotted; one legend for all panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = {r["dataset"] for r in records}
    names = [name for name in FULL["datasets"] if name in present] + sorted(present - set(FULL["datasets"]))
    methods = list(dict.fromkeys(r["method"] for r in sorted(records, key=lambda r: r["method"])))
    learned_methods = [m for m in methods if any(r["fit_seconds"] > 0 for r in records if r["method"] == m)]
    free_methods = [m for m in methods if m not in learned_methods]
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(learned_methods)}
    colours |= {m: plt.cm.tab20b(i % 20) for i, m in enumerate(free_methods)}
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names) + 3.6, 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], names):
        rows = [r for r in records if r["dataset"] == dataset]
        for method in free_methods + learned_methods:                  # learned lines drawn on top
            points = sorted((r["nfe"], r["error"]) for r in rows if r["method"] == method)
            if not points:
                continue
            learned_line = method in learned_methods
            ax.plot(*zip(*points), "-" if learned_line else ":", marker="o", markersize=3 if learned_line else 2,
                    linewidth=2 if learned_line else 1, alpha=1 if learned_line else 0.7, color=colours[method],
                    label=method)
        ax.set(yscale="log", xlabel="NFE", ylabel="mean L2 error to the ODE solution", title=dataset)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    fig.legend([handles[m] for m in learned_methods + free_methods if m in handles],
               [m for m in learned_methods + free_methods if m in handles], loc="center right", fontsize=7, ncol=2,
               title="learned (solid) / training-free (dotted)", title_fontsize=7)
    fig.tight_layout(rect=(0, 0, 1 - 3.5 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="under 3 minutes on 2 cores")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench" / "mnist",
                        help="the MNIST bench models (benchmarks/mnist_models.py); quick ones: runs/bench/mnist-quick")
    parser.add_argument("--datasets", help="comma-separated subset of " + ",".join(FULL["datasets"]))
    parser.add_argument("--nfes", help="comma-separated NFEs (default: the mode's)")
    args = parser.parse_args()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    spec, start = QUICK if args.quick else FULL, time.perf_counter()
    if args.datasets:
        spec = {**spec, "datasets": tuple(args.datasets.split(","))}
    if args.nfes:
        nfes = tuple(int(n) for n in args.nfes.split(","))
        spec = {**spec, "nfes": nfes, **{k: {**v, "nfes": nfes} for k, v in spec.items() if k in NETWORKS}}
    warnings.simplefilter("ignore", NotImprovedWarning)         # the fits keep their base; the table shows it
    records = []
    # small tensors (mixtures, 8x8 digits): a second thread only adds synchronisation, 10x slower on a shared machine
    torch.set_num_threads(1)
    path = args.out_dir / f"fast_sampling{'_quick' if args.quick else ''}.json"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, case in datasets(spec["datasets"], args.quick, args.runs, log).items():
        log(f"[{name}]")
        for nfe_records in run_dataset(name, case, spec, log):
            records += nfe_records
            write_results(path, records, spec, start)             # after every NFE: a killed run keeps its rows
    records = json.loads(path.read_text())["records"]
    summary = ratios(records)
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        print(table(records, dataset), end="\n\n")
    print("| dataset / NFE | best learned | best training-free | ratio | goal |\n|---|---|---|---:|---:|")
    for key, value in summary.items():
        print(f"| {key} | {value['best_learned']} | {value['best_training_free']} | {value['ratio']:.2f} | "
              f"≤ {value['goal']} |")
    figure(records, path.with_suffix(".png"))
    log(f"done in {time.perf_counter() - start:.1f} s; {path}")


def write_results(path: Path, records: list[dict], spec: dict, start: float) -> None:
    """Merge this run's records into the results file (under a lock: data sets and NFEs may run in parallel)."""
    run = {"id": f"{os.getpid()}@{start}", "datasets": sorted({r["dataset"] for r in records}),
           "nfes": sorted({r["nfe"] for r in records}),
           "seconds": round(time.perf_counter() - start, 1),
           "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}}
    with FileLock(str(path) + ".lock"):
        merged_records, runs = merged(path, records, run)
        report = {"records": merged_records, "ratios": ratios(merged_records), "runs": runs, "grid_solver": GRID_SOLVER}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
