"""Benchmark: DEFT vs DPS vs ΠGDM vs the unconditional floor on held-out digits (docs/methods/deft.md).

Base: the demo's digits U-Net (trained once and cached under --cache; the 100-step model with
--quick, as benchmarks/solvers.py). For each task, with measurement noise σ_y = 0.05,

    inpaint   the right half of each digit hidden (box mask)
    superres  ×2 average pooling (8×8 → 4×4)
    blur      Gaussian kernel 5×5, std 1 px

a DEFT h-network is fitted on the training split (base frozen), then every method reconstructs the
held-out digits from the same measurements and the same per-sample noise, with the same solver and
the same number of model evaluations (Heun; DPS and ΠGDM add a VJP through the base per evaluation,
DEFT one small h-network call). Reported: PSNR and SSIM against the truth (mean ± s.e.), the digit
classifier's accuracy on the reconstructions, the sampling time per image, the total time for 1,000
reconstructions (DEFT: its fitting time included; the others: sampling only, extrapolated from the
measured per-image time), and the h-network's parameters as a fraction of the base's.

Prints one markdown table per task, writes benchmarks/results/deft.json (deft_quick.json with
--quick) and a figure measurement | DEFT | DPS | ΠGDM | truth (3 digits per task).

    OMP_NUM_THREADS=2 python benchmarks/deft.py [--quick] [--out-dir DIR] [--cache DIR]

--quick (~2 minutes on 2 cores): the 100-step base, 60 fitting steps of 32 pairs, 16 digits, 9 NFE.
Full: the 500-step base, 2,000 fitting steps of 64 pairs, all 297 held-out digits, 19 NFE.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

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
from difflab.data import load_digits
from difflab.metrics import get_digit_classifier

sys.path.insert(0, str(Path(__file__).parent))
from solvers import digits_model  # noqa: E402  (the demo's digits U-Net, cached; shared by the benchmarks)

ROOT = Path(__file__).resolve().parent.parent
TASKS = {"inpaint": {"mask": "box", "fraction": 0.5}, "superres": {"factor": 2},
         "blur": {"kernel_size": 5, "kernel_std": 1.0}}
METHODS = ("deft", "dps", "pigdm", "uncond")
LABELS = {"deft": "DEFT", "dps": "DPS", "pigdm": "ΠGDM", "uncond": "unconditional"}
SIGMA_Y = 0.05


def run_task(base, task: str, options: dict, n: int, fit_steps: int, fit_batch: int, nfe: int, zeta: float,
             seed: int, log) -> tuple[dict, dict]:
    operator = make_operator(task, (1, 8, 8), sigma_y=SIGMA_Y, **options)
    log(f"  fitting DEFT for {task} ({fit_steps} steps × {fit_batch} pairs)")
    start = time.perf_counter()
    config = DEFTConfig(train_steps=fit_steps, batch_size=fit_batch, seed=seed, device="cpu",
                        checkpoint_every=fit_steps)
    hnet = fit_deft(base, operator, load_digits("train").x, config).model
    fit_seconds = time.perf_counter() - start
    test = load_digits("test")
    truth, labels = test.x[:n], test.labels[:n]
    batch_operator, y = simulate(operator, truth, seed)
    classifier = get_digit_classifier()
    rows, images = {}, {"measurement": batch_operator.image_input(y)}
    for method in METHODS:
        denoiser = make_denoiser(method, base, batch_operator, hnet, zeta=zeta, weight=PIGDM_WEIGHT)
        start = time.perf_counter()
        x = reconstruct(denoiser, y, range(seed, seed + n), (1, 8, 8), "heun", nfe, conditional=method != "uncond")
        seconds = (time.perf_counter() - start) / n
        total_1000 = 1000 * seconds + (fit_seconds if method == "deft" else 0.0)
        rows[method] = {"psnr": summarise(psnr(x, truth)), "ssim": summarise(ssim(x, truth)),
                        "classifier_accuracy": round(classifier.accuracy(x, labels), 4),
                        "seconds_per_image": round(seconds, 5), "seconds_for_1000": round(total_1000, 1)}
        images[LABELS[method]] = x
        log(f"    {method}: PSNR {rows[method]['psnr']['mean']:.2f}, {seconds * 1e3:.1f} ms/image")
    images["truth"] = truth
    result = {"operator": operator.config() | {"mask": None}, "fit_steps": fit_steps, "fit_batch": fit_batch,
              "fit_seconds": round(fit_seconds, 1), "hnet_parameters": sum(p.numel() for p in hnet.parameters()),
              "hnet_fraction_of_base": round(parameter_fraction(hnet, base), 4), "methods": rows,
              "speedup_deft_vs_dps": round(rows["dps"]["seconds_per_image"] / rows["deft"]["seconds_per_image"], 2),
              "speedup_deft_vs_pigdm": round(rows["pigdm"]["seconds_per_image"] / rows["deft"]["seconds_per_image"], 2)}
    return result, images


def table(task: str, result: dict) -> str:
    lines = [f"### {task} (DEFT fit: {result['fit_steps']} steps, {result['fit_seconds']} s; h-network "
             f"{100 * result['hnet_fraction_of_base']:.1f}% of the base)", "",
             "| method | PSNR ↑ | SSIM ↑ | classifier acc. ↑ | ms / image | s for 1,000 (incl. fit) |",
             "|---|---|---|---|---|---|"]
    for method, row in result["methods"].items():
        lines.append(f"| {LABELS[method]} | {row['psnr']['mean']:.2f} ± {row['psnr']['sem']:.2f} | "
                     f"{row['ssim']['mean']:.3f} ± {row['ssim']['sem']:.3f} | {row['classifier_accuracy']:.3f} | "
                     f"{1e3 * row['seconds_per_image']:.1f} | {row['seconds_for_1000']:.0f} |")
    lines.append(f"\nsampling speed-up of DEFT: ×{result['speedup_deft_vs_dps']} vs DPS, "
                 f"×{result['speedup_deft_vs_pigdm']} vs ΠGDM")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a ~2-minute run (smaller everything)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench",
                        help="where the digits model is cached (reused if present)")
    parser.add_argument("--zeta", type=float, default=DPS_ZETA, help="DPS step size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    wall_start, load_start = time.perf_counter(), os.getloadavg()
    base_steps = 100 if args.quick else DIGITS_STEPS
    n, fit_steps, fit_batch, nfe = (16, 60, 32, 9) if args.quick else (297, 2000, 64, 19)
    log(f"digits model ({base_steps} steps, cached in {args.cache})")
    base, base_seconds = digits_model(args.cache / ("digits" if base_steps == DIGITS_STEPS else f"digits-{base_steps}"),
                                      base_steps, args.seed)
    results, figure_columns = {}, {}
    for task, options in TASKS.items():
        log(f"task {task}")
        results[task], images = run_task(base, task, options, n, fit_steps, fit_batch, nfe, args.zeta, args.seed, log)
        for label in ("measurement", "DEFT", "DPS", "ΠGDM", "truth"):
            figure_columns.setdefault(label, []).append(images[label][:3])
        print(table(task, results[task]) + "\n", flush=True)
    suffix = "_quick" if args.quick else ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    figure = args.out_dir / f"deft{suffix}.png"
    save_comparison({k: torch.cat(v) for k, v in figure_columns.items()}, figure,
                    f"rows: {', '.join(TASKS)} (3 digits each); Heun, {nfe} NFE for every method")
    report = {"quick": args.quick, "seed": args.seed, "solver": "heun", "nfe": nfe, "n_images": n,
              "sigma_y": SIGMA_Y, "dps_zeta": args.zeta, "pigdm_weight": PIGDM_WEIGHT,
              "base_steps": base_steps, "base_train_seconds": round(base_seconds, 1),
              "base_parameters": sum(p.numel() for p in base.parameters()), "tasks": results,
              "figure": figure.name, "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                                 "threads": torch.get_num_threads(), "loadavg_start": load_start,
                                                 "loadavg_end": os.getloadavg()},
              "wall_seconds": round(time.perf_counter() - wall_start, 1)}
    out = args.out_dir / f"deft{suffix}.json"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)
    log(f"wrote {out} and {figure} in {report['wall_seconds']} s")


if __name__ == "__main__":
    main()
