"""Benchmark: DEFT vs DPS vs ΠGDM vs the unconditional floor on held-out digits (docs/methods/deft.md).

--dataset digits (default): the demo's digits U-Net (trained once and cached under --cache; the 100-step
model with --quick, as benchmarks/solvers.py), 8×8 images, three tasks:

    inpaint   the right half of each digit hidden (box mask)
    superres  ×2 average pooling (8×8 → 4×4)
    blur      Gaussian kernel 5×5, std 1 px

--dataset mnist: real 28×28 MNIST digits and the class-conditional bench model `full` of
benchmarks/mnist_models.py (from --runs; missing: `make bench-models`, exit 2) used unconditionally
(no class label: its null class −1), five tasks:

    inpaint_box     the right half hidden          superres2   ×2 average pooling (28 → 14)
    inpaint_random  half the pixels hidden, a      superres4   ×4 average pooling (28 → 7)
                    fresh random mask per image    blur        Gaussian kernel 9×9, std 2 px

For each task, with measurement noise σ_y = 0.05, a DEFT h-network is fitted on the training split
(base frozen), then every method reconstructs held-out digits from the same measurements and the same
per-sample noise, with the same solver and the same number of model evaluations (Heun; DPS and ΠGDM
add a VJP through the base per evaluation, DEFT one small h-network call). Reported: PSNR and SSIM
against the truth (mean ± s.e.), the classifier's accuracy on the reconstructions (MNIST: also their
Fréchet distance in classifier features against the test split, beside the real-data floor at the same
n), the sampling time per image, the h-network's parameters as a fraction of the base's, and the total
time for 1,000 reconstructions (DEFT: its fitting time included; the others: sampling only, from the
measured per-image time). With MNIST, each method also runs a small NFE sweep on the first images
(DPS's reaches further) and the 1,000-image total is taken at the NFE of its best PSNR.
A "goals" block (the paper's: DEFT sampling ≥ 3× faster than DPS at equal NFE, its total including the
fit below DPS's, a better PSNR than both baselines, an h-network ≤ 10% of the base) gives each goal's
figure (the worst task) and met / missed.

Prints one markdown table per task, writes benchmarks/results/deft[_quick].json (MNIST:
deft_mnist[_quick].json, "dataset": "mnist") and a figure measurement | DEFT | DPS | ΠGDM | truth.

    OMP_NUM_THREADS=2 python benchmarks/deft.py [--quick] [--dataset digits|mnist] [--runs DIR] [--tasks A,B]
                                                [--device cpu|cuda] [--out-dir DIR] [--cache DIR]

MNIST keeps each finished task under RUNS/deft/<task>-<key> (its result and figure images; the key hashes the
base model's fingerprint and every setting), so an interrupted run resumes at the first unfinished task, and
--tasks runs a subset now (the report then says "all_tasks": false) that a later full run reads back.

digits --quick (~2 minutes on 2 cores): the 100-step base, 60 fitting steps of 32 pairs, 16 digits, 9 NFE.
digits full: the 500-step base, 2,000 fitting steps of 64 pairs, all 297 held-out digits, 19 NFE.
mnist --quick (a smoke run, 2–5 minutes on 2 shared cores, with --runs runs/bench/mnist-quick):
8 digits, 20 fitting steps of 16 pairs, 5 NFE, sweep NFE 3–9.
mnist full (the headline; expected CPU time about 2–4 hours on 2 cores, scaled from the quick run's per-step
and per-image times: per task a fit of 10–25 min, the equal-NFE runs ~7 min and the sweeps ~8 min; much less
on a GPU with --device cuda):

    OMP_NUM_THREADS=2 python benchmarks/deft.py --dataset mnist --runs runs/bench/mnist

100 test digits, 1,000 fitting steps of 32 pairs per task, Heun 19 NFE for the equal-NFE comparison,
NFE sweep {5, 9, 19, 39} (DPS {9, 19, 39, 79}) on the first 32 digits.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from difflab.apps.demo.condition import save_comparison
from difflab.apps.demo.run import DIGITS_STEPS
from difflab.condition.deft import DEFTConfig, fit_deft, parameter_fraction
from difflab.condition.reconstruct import (
    DPS_ZETA,
    PIGDM_WEIGHT,
    make_denoiser,
    make_operator,
    psnr,
    reconstruct,
    simulate,
    ssim,
    summarise,
)
from difflab.core import fingerprint
from difflab.core.io import atomic_path, write_json
from difflab.data import load_digits, load_mnist
from difflab.metrics import frechet, frechet_floor, get_classifier

sys.path.insert(0, str(Path(__file__).parent))
from _kept import settings_key  # noqa: E402  (benchmark results kept between runs)
from _mnist import bench_train_seconds, load_bench_models, results_name  # noqa: E402  (the MNIST bench models)
from solvers import digits_model  # noqa: E402  (the demo's digits U-Net, cached; shared by the benchmarks)

ROOT = Path(__file__).resolve().parent.parent
# benchmark task name -> (operator, its options)
TASKS = {"digits": {"inpaint": ("inpaint", {"mask": "box", "fraction": 0.5}),
                    "superres": ("superres", {"factor": 2}),
                    "blur": ("blur", {"kernel_size": 5, "kernel_std": 1.0})},
         "mnist": {"inpaint_box": ("inpaint", {"mask": "box", "fraction": 0.5}),
                   "inpaint_random": ("inpaint", {"mask": "random", "fraction": 0.5}),
                   "superres2": ("superres", {"factor": 2}),
                   "superres4": ("superres", {"factor": 4}),
                   "blur": ("blur", {"kernel_size": 9, "kernel_std": 2.0})}}
METHODS = ("deft", "dps", "pigdm", "uncond")
LABELS = {"deft": "DEFT", "dps": "DPS", "pigdm": "ΠGDM", "uncond": "unconditional"}
SIGMA_Y = 0.05
# DPS's step size per MNIST task (--zeta overrides): the library default 0.3 (tuned on the 8×8 digits) leaves DPS
# next to the unconditional samples at 28×28. `python benchmarks/dps_zeta_mnist.py` (Heun 19 NFE, the first 32 test
# digits; PSNR dB at ζ = 0.3 / 1 / 3 / 10 / 30): inpaint_box 9.49 / 11.09 / 11.67 / 10.61 / 9.67, inpaint_random
# 9.53 / 11.25 / 12.79 / 12.49 / 11.69, superres2 9.22 / 10.40 / 14.46 / 14.93 / 13.71, superres4 8.95 / 9.33 /
# 10.48 / 12.07 / 10.64, blur 9.27 / 10.41 / 12.60 / 10.59 / 7.46: the best of each.
MNIST_DPS_ZETA = {"inpaint_box": 3.0, "inpaint_random": 3.0, "superres4": 10.0, "superres2": 10.0, "blur": 3.0}
# (n test images, fit steps, fit batch, NFE of the equal-NFE comparison, sweep images, NFE sweep per method)
SETTINGS = {("digits", True): (16, 60, 32, 9, 0, {}),
            ("digits", False): (297, 2000, 64, 19, 0, {}),
            ("mnist", True): (8, 20, 16, 5, 8, {"deft": (3, 5), "pigdm": (3, 5), "dps": (3, 5, 9)}),
            ("mnist", False): (100, 1000, 32, 19, 32, {"deft": (5, 9, 19, 39), "pigdm": (5, 9, 19, 39),
                                                      "dps": (9, 19, 39, 79)})}
GOAL_SPEEDUP, GOAL_HNET_SHARE = 3.0, 0.10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run of every code path (smaller everything)")
    parser.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench" / "mnist",
                        help="MNIST: the bench models' folder (runs/bench/mnist-quick for smoke runs)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench",
                        help="digits: where the digits model is cached (reused if present)")
    parser.add_argument("--zeta", type=float, default=None,
                        help=f"DPS step size for every task (default: digits {DPS_ZETA}, MNIST per task)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated subset of the data set's tasks (default: all of them)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    known = list(TASKS[args.dataset])
    args.tasks = known if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(args.tasks) - set(known))
    if unknown or not args.tasks:
        parser.error(f"--tasks: unknown {', '.join(unknown) or '(none given)'} for {args.dataset}; "
                     f"choose from {', '.join(known)}")
    (args.n, args.fit_steps, args.fit_batch, args.nfe, args.n_sweep,
     args.sweep) = SETTINGS[(args.dataset, args.quick)]
    return args


def load_base(args: argparse.Namespace, log) -> tuple[torch.nn.Module, float | None, dict]:
    """(frozen base denoiser, its training seconds (None: not known, see `bench_train_seconds`), what it is) for
    the data set."""
    if args.dataset == "mnist":
        base = load_bench_models(args.runs, ("full",), args.device)["full"].requires_grad_(False)
        log(f"MNIST bench model `full` from {args.runs}, used unconditionally (null class)")
        return base, bench_train_seconds(args.runs, "full"), {"base": "mnist full (null class)", "runs": str(args.runs)}
    base_steps = 100 if args.quick else DIGITS_STEPS
    log(f"digits model ({base_steps} steps, cached in {args.cache})")
    base, seconds = digits_model(args.cache / ("digits" if base_steps == DIGITS_STEPS else f"digits-{base_steps}"),
                                 base_steps, args.seed)
    return base.to(args.device), seconds, {"base_steps": base_steps}


def split(dataset: str, name: str):
    return load_mnist(name) if dataset == "mnist" else load_digits(name)


# ----- one task ----------------------------------------------------------------------------------------
def fit_hnet(base, operator, args: argparse.Namespace, log) -> tuple[torch.nn.Module, float, float]:
    """(h-network, wall seconds, this process's CPU seconds) of one fit. CPU seconds far below wall × threads
    mean other processes shared the cores: the 8×8 inpainting fit's 10× wall time in the 2,000-step run
    was that (profiled: the same CPU time per step as super-resolution's within 5%)."""
    log(f"  fitting DEFT ({args.fit_steps} steps × {args.fit_batch} pairs)")
    start, cpu_start = time.perf_counter(), time.process_time()
    config = DEFTConfig(train_steps=args.fit_steps, batch_size=args.fit_batch, seed=args.seed, device=args.device,
                        checkpoint_every=args.fit_steps)
    hnet = fit_deft(base, operator, split(args.dataset, "train").x.to(args.device), config).model
    return hnet, time.perf_counter() - start, time.process_time() - cpu_start


def run_method(method: str, base, operator, hnet, y, shape, nfe: int, args: argparse.Namespace, n: int):
    """(reconstructions [n, *shape] on the CPU, seconds per image) of one method at one NFE."""
    denoiser = make_denoiser(method, base, operator, hnet, zeta=args.zeta, weight=PIGDM_WEIGHT)
    start = time.perf_counter()
    x = reconstruct(denoiser, y[:n], range(args.seed, args.seed + n), shape, "heun", nfe,
                    conditional=method != "uncond")
    if args.device == "cuda":
        torch.cuda.synchronize()
    return x.cpu(), (time.perf_counter() - start) / n


def sweep(base, operator, hnet, y, truth, shape, args: argparse.Namespace, equal_nfe: dict, log) -> dict:
    """{method: {"psnr": {nfe: mean}, "seconds_per_image": {nfe: s}, "best_nfe": nfe}} on the first n_sweep
    images; the equal-NFE run's first images stand in for that NFE (samples depend only on their seeds)."""
    n, rows = args.n_sweep, {}
    for method, nfes in args.sweep.items():
        psnrs, seconds = {}, {}
        for nfe in nfes:
            if nfe == args.nfe:
                psnrs[nfe], seconds[nfe] = float(equal_nfe[method]["psnr_values"][:n].mean()), \
                    equal_nfe[method]["seconds_per_image"]
                continue
            x, seconds[nfe] = run_method(method, base, operator, hnet, y, shape, nfe, args, n)
            psnrs[nfe] = float(psnr(x, truth[:n]).mean())
            log(f"    sweep {method} NFE {nfe}: PSNR {psnrs[nfe]:.2f}, {seconds[nfe] * 1e3:.1f} ms/image")
        best = max(psnrs, key=psnrs.get)
        rows[method] = {"psnr": {k: round(v, 3) for k, v in psnrs.items()},
                        "seconds_per_image": {k: round(v, 5) for k, v in seconds.items()}, "best_nfe": best}
    return rows


def run_task(base, task: str, args: argparse.Namespace, log) -> tuple[dict, dict]:
    operator_name, options = TASKS[args.dataset][task]
    test = split(args.dataset, "test")
    shape = tuple(test.x.shape[1:])
    operator = make_operator(operator_name, shape, sigma_y=SIGMA_Y, **options)
    hnet, fit_seconds, fit_cpu_seconds = fit_hnet(base, operator, args, log)
    truth, labels = test.x[:args.n], test.labels[:args.n]
    batch_operator, y = simulate(operator, truth.to(args.device), args.seed)
    classifier = get_classifier(args.dataset)
    rows, images = {}, {"measurement": batch_operator.image_input(y).cpu()}
    for method in METHODS:
        x, seconds = run_method(method, base, batch_operator, hnet, y, shape, args.nfe, args, args.n)
        psnr_values = psnr(x, truth)
        rows[method] = {"psnr": summarise(psnr_values), "ssim": summarise(ssim(x, truth)),
                        "classifier_accuracy": round(classifier.accuracy(x, labels), 4),
                        "seconds_per_image": round(seconds, 5),
                        "seconds_for_1000": round(1000 * seconds + (fit_seconds if method == "deft" else 0.0), 1),
                        "psnr_values": psnr_values}
        if args.dataset == "mnist":
            rows[method]["frechet"] = round(frechet("mnist", x), 3)
        images[LABELS[method]] = x
        log(f"    {method}: PSNR {rows[method]['psnr']['mean']:.2f}, {seconds * 1e3:.1f} ms/image")
    images["truth"] = truth
    result = {"operator": operator.config() | {"mask": None}, "dps_zeta": args.zeta, "fit_steps": args.fit_steps,
              "fit_batch": args.fit_batch, "fit_seconds": round(fit_seconds, 1),
              "fit_cpu_seconds": round(fit_cpu_seconds, 1),
              "hnet_parameters": sum(p.numel() for p in hnet.parameters()),
              "hnet_fraction_of_base": round(parameter_fraction(hnet, base), 4)}
    if args.sweep:
        # sweeps run on the first n_sweep measurements with their own masks: slice the batch operator's
        result["sweep"] = sweep(base, batch_operator_slice(batch_operator, args.n_sweep), hnet, y[:args.n_sweep],
                                truth, shape, args, rows, log)
        result["best_nfe_totals"] = best_nfe_totals(result["sweep"], fit_seconds)
        result["frechet_floor"] = round(frechet_floor("mnist", args.n), 3)
    for row in rows.values():
        row.pop("psnr_values")
    result |= {"methods": rows,
               "speedup_deft_vs_dps": round(rows["dps"]["seconds_per_image"] / rows["deft"]["seconds_per_image"], 2),
               "speedup_deft_vs_pigdm": round(rows["pigdm"]["seconds_per_image"] / rows["deft"]["seconds_per_image"],
                                              2)}
    return result, images


def batch_operator_slice(operator, n: int):
    """The operator of the first n samples (a per-sample mask sliced; a shared one kept)."""
    mask = operator.mask
    if mask is None or mask.ndim == len(getattr(operator, "shape", ())) or len(mask) == n:
        return operator
    return type(operator)(mask[:n], operator.sigma_y, operator.kind, operator.fraction, operator.shape)


def best_nfe_totals(sweep_rows: dict, fit_seconds: float) -> dict:
    """{method: {nfe, psnr, seconds_for_1000}}: each method at the NFE of its best PSNR, DEFT's fit included."""
    totals = {}
    for method, row in sweep_rows.items():
        nfe = row["best_nfe"]
        seconds = 1000 * row["seconds_per_image"][nfe] + (fit_seconds if method == "deft" else 0.0)
        totals[method] = {"nfe": nfe, "psnr": row["psnr"][nfe], "seconds_for_1000": round(seconds, 1)}
    return totals


# ----- finished tasks, kept (MNIST: 25–40 CPU minutes each) ---------------------------------------------
FIGURE_KEYS = {"measurement": "measurement", "DEFT": "deft", "DPS": "dps", "ΠGDM": "pigdm", "truth": "truth"}


def task_args(task: str, args: argparse.Namespace) -> argparse.Namespace:
    """`args` with `zeta` set to the DPS step size of `task`: --zeta, else the data set's default for it."""
    default = MNIST_DPS_ZETA[task] if args.dataset == "mnist" else DPS_ZETA
    return argparse.Namespace(**{**vars(args), "zeta": args.zeta if args.zeta is not None else default})


def task_folder(base, task: str, args: argparse.Namespace) -> Path:
    """RUNS/deft/<task>-<key>: one finished MNIST task, keyed by the base model's fingerprint, the test images
    and every setting that changes its numbers, so an interrupted run (or one with --tasks) resumes and a
    changed one reruns."""
    truth = split(args.dataset, "test").x[:args.n].contiguous()
    settings = {"task": task, "base": fingerprint(base), "truth": hashlib.sha256(truth.numpy().tobytes()).hexdigest(),
                "n": args.n, "fit_steps": args.fit_steps,
                "fit_batch": args.fit_batch, "nfe": args.nfe, "n_sweep": args.n_sweep,
                "sweep": {k: list(v) for k, v in args.sweep.items()}, "seed": args.seed, "zeta": args.zeta,
                "sigma_y": SIGMA_Y, "pigdm_weight": PIGDM_WEIGHT, "device": args.device}
    return args.runs / "deft" / f"{task}-{settings_key(settings)}"


def save_task(folder: Path, result: dict, images: dict) -> None:
    """The task's result (JSON) and its figure images (the first three of each column, safetensors)."""
    with atomic_path(folder / "images.safetensors") as tmp:
        save_file({FIGURE_KEYS[k]: images[k][:3].contiguous() for k in FIGURE_KEYS}, str(tmp))
    write_json(folder / "result.json", result)   # written last: its presence marks the task finished


def load_task(folder: Path) -> tuple[dict, dict] | None:
    """(result, figure images) of a finished task, or None. JSON made the sweep's NFE keys strings."""
    if not (folder / "result.json").is_file():
        return None
    result = json.loads((folder / "result.json").read_text())
    for row in result.get("sweep", {}).values():
        row["psnr"] = {int(k): v for k, v in row["psnr"].items()}
        row["seconds_per_image"] = {int(k): v for k, v in row["seconds_per_image"].items()}
    tensors = load_file(str(folder / "images.safetensors"))
    return result, {label: tensors[key] for label, key in FIGURE_KEYS.items()}


# ----- goals and tables --------------------------------------------------------------------------------
def goals(results: dict) -> dict:
    """The paper's four goals: each one's figure on the worst task, per-task figures, met or missed. PSNR and
    the 1,000-image totals at each method's best NFE where a sweep ran, else at the equal NFE."""
    def at_best(result: dict, method: str, key: str):
        if "best_nfe_totals" in result:
            return result["best_nfe_totals"][method][key]
        row = result["methods"][method]
        return row["psnr"]["mean"] if key == "psnr" else row[key]

    per_task = {
        "speedup": {t: r["speedup_deft_vs_dps"] for t, r in results.items()},
        "total_ratio": {t: round(at_best(r, "deft", "seconds_for_1000") / at_best(r, "dps", "seconds_for_1000"), 3)
                        for t, r in results.items()},
        "psnr_margin": {t: round(at_best(r, "deft", "psnr") - max(at_best(r, "dps", "psnr"),
                                                                  at_best(r, "pigdm", "psnr")), 3)
                        for t, r in results.items()},
        "share": {t: r["hnet_fraction_of_base"] for t, r in results.items()}}
    figures = {"speedup": min(per_task["speedup"].values()), "total_ratio": max(per_task["total_ratio"].values()),
               "psnr_margin": min(per_task["psnr_margin"].values()), "share": max(per_task["share"].values())}
    spec = {"speedup": ("deft_sampling_speedup_vs_dps_at_equal_nfe", f"≥ {GOAL_SPEEDUP}",
                        figures["speedup"] >= GOAL_SPEEDUP),
            "total_ratio": ("deft_total_incl_fit_over_dps_total_for_1000", "< 1", figures["total_ratio"] < 1),
            "psnr_margin": ("deft_psnr_minus_best_baseline_db", "> 0", figures["psnr_margin"] > 0),
            "share": ("hnet_parameters_share_of_base", f"≤ {GOAL_HNET_SHARE}", figures["share"] <= GOAL_HNET_SHARE)}
    return {name: {"goal": target, "figure": figures[key], "per_task": per_task[key],
                   "status": "met" if met else "missed"} for key, (name, target, met) in spec.items()}


def table(task: str, result: dict) -> str:
    has_fd = "frechet" in result["methods"]["deft"]
    lines = [f"### {task} (DEFT fit: {result['fit_steps']} steps, {result['fit_seconds']} s; h-network "
             f"{100 * result['hnet_fraction_of_base']:.1f}% of the base; DPS ζ = {result.get('dps_zeta', '?')})", "",
             "| method | PSNR ↑ | SSIM ↑ | classifier acc. ↑ |" + (" FD ↓ |" if has_fd else "") +
             " ms / image | s for 1,000 (incl. fit) |",
             "|---|---|---|---|---|---|" + ("---|" if has_fd else "")]
    for method, row in result["methods"].items():
        fd = f" {row['frechet']:.2f} |" if has_fd else ""
        lines.append(f"| {LABELS[method]} | {row['psnr']['mean']:.2f} ± {row['psnr']['sem']:.2f} | "
                     f"{row['ssim']['mean']:.3f} ± {row['ssim']['sem']:.3f} | {row['classifier_accuracy']:.3f} |"
                     f"{fd} {1e3 * row['seconds_per_image']:.1f} | {row['seconds_for_1000']:.0f} |")
    lines.append(f"\nsampling speed-up of DEFT at equal NFE: ×{result['speedup_deft_vs_dps']} vs DPS, "
                 f"×{result['speedup_deft_vs_pigdm']} vs ΠGDM" +
                 (f"; FD floor of real digits at this n: {result['frechet_floor']:.2f}" if has_fd else ""))
    if "sweep" in result:
        lines += ["", "| method | PSNR by NFE | best NFE | ms / image there | s for 1,000 there (incl. fit) |",
                  "|---|---|---|---|---|"]
        for method, row in result["sweep"].items():
            best = result["best_nfe_totals"][method]
            by_nfe = ", ".join(f"{nfe}: {value:.2f}" for nfe, value in row["psnr"].items())
            lines.append(f"| {LABELS[method]} | {by_nfe} | {best['nfe']} | "
                         f"{1e3 * row['seconds_per_image'][best['nfe']]:.1f} | {best['seconds_for_1000']:.0f} |")
    return "\n".join(lines)


def goals_table(goal_rows: dict) -> str:
    lines = ["### goals (figure: the worst task)", "", "| goal | target | figure | status |", "|---|---|---|---|"]
    lines += [f"| {name} | {row['goal']} | {row['figure']} | {row['status']} |" for name, row in goal_rows.items()]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    wall_start, load_start = time.perf_counter(), os.getloadavg()
    base, base_seconds, base_info = load_base(args, log)
    get_classifier(args.dataset)   # trained once and cached, before any timing
    results, figure_columns, cached = {}, {}, []
    for task in args.tasks:
        args_of_task = task_args(task, args)
        folder = task_folder(base, task, args_of_task) if args.dataset == "mnist" else None
        kept = load_task(folder) if folder else None
        if kept:
            log(f"task {task}: finished earlier, read from {folder}")
            cached.append(task)
            results[task], images = kept
        else:
            log(f"task {task}")
            results[task], images = run_task(base, task, args_of_task, log)
            if folder:
                save_task(folder, results[task], images)
        for label in FIGURE_KEYS:
            figure_columns.setdefault(label, []).append(images[label][:3])
        print(table(task, results[task]) + "\n", flush=True)
    goal_rows = goals(results)
    print(goals_table(goal_rows), flush=True)
    write_report(args, base, base_seconds, base_info, results, goal_rows, figure_columns, wall_start, load_start,
                 cached, log)


def write_report(args, base, base_seconds, base_info, results, goal_rows, figure_columns, wall_start, load_start,
                 cached, log) -> None:
    stem = Path(results_name("deft", args.quick)).stem if args.dataset == "mnist" else \
        f"deft{'_quick' if args.quick else ''}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    figure = args.out_dir / f"{stem}.png"
    rows_per_task = [len(images) for images in next(iter(figure_columns.values()))]   # ≤ 3 per task
    save_comparison({k: torch.cat(v) for k, v in figure_columns.items()}, figure,
                    f"Heun, {args.nfe} NFE for every method",
                    row_labels=[task for task, rows in zip(args.tasks, rows_per_task) for _ in range(rows)])
    report = {"dataset": args.dataset, "quick": args.quick, "seed": args.seed, "solver": "heun", "nfe": args.nfe,
              "n_images": args.n, "sigma_y": SIGMA_Y,
              "dps_zeta": {t: r["dps_zeta"] for t, r in results.items()}, "pigdm_weight": PIGDM_WEIGHT,
              **base_info, "base_train_seconds": None if base_seconds is None else round(base_seconds, 1),
              "base_parameters": sum(p.numel() for p in base.parameters()), "tasks": results, "goals": goal_rows,
              "all_tasks": set(args.tasks) == set(TASKS[args.dataset]), "tasks_read_from_earlier_runs": cached,
              "figure": figure.name, "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                                 "device": args.device, "threads": torch.get_num_threads(),
                                                 "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
              "wall_seconds": round(time.perf_counter() - wall_start, 1)}
    if args.sweep:
        report |= {"sweep_images": args.n_sweep, "sweep_nfe": args.sweep}
    out = args.out_dir / f"{stem}.json"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)
    log(f"wrote {out} and {figure} in {report['wall_seconds']} s")


if __name__ == "__main__":
    main()
