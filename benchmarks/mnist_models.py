"""Benchmark: the MNIST base models that the MNIST benchmarks build on (docs/data.md).

Trains, with the project loop (train_denoiser, EDM preconditioning, EMA, checkpoints, exact resume):
- full: a class-conditional U-Net (label dropout 0.1: the null class −1, ready for guidance) on all 10 classes;
- 0-4, 5-9: unconditional U-Nets on half the classes each (the two models of SuperDiff OR).
Each goes to RUNS/<name>/ (model/: the finished model; checkpoints/: resumable; run.json: what it cost);
a finished model is loaded, not retrained, and an interrupted one resumes. The step count comes from a
wall-time budget (default 60 minutes per model): a few probe steps time one step on this machine, and the
plan is kept in run.json so a resumed run keeps it; --train-steps overrides it. A run whose logged loss
reaches twice its best goes back to its state at the log point before with half the learning rate (up to MNIST_ROLLBACKS
times, recorded in run.json as "rollbacks"); one that still diverges is not saved (exit status 1).

Then, per model: n samples (default 1,000; Heun, 35 NFE), their Fréchet distance in MNIST-classifier
features against the test split (the half models: against the test images of their classes) next to the
real-data floor at the same n (training vs test images), and the classifier's accuracy on the full model's
class-conditional samples (labels i mod 10) or the half models' in-class fraction; for the full model also
the FD of its null-class (unconditional) samples, the denoiser that fast_sampling.py runs. Writes a table,
sample grids and benchmarks/results/mnist_models.json (one entry per device kind, so a GPU run sits beside
the CPU one; rewritten after every model, so an interrupted run keeps what it measured). Needs MNIST cached
(`make data`).

    python benchmarks/mnist_models.py [--quick] [--budget-minutes M | --train-steps N] [--device auto|cpu|cuda]
                                      [--n 1000] [--seed 0] [--runs DIR] [--out PATH]

--quick: a smoke run of every code path (a 10-second budget per model, 50 samples, Heun 7 NFE) into
runs/bench/mnist-quick and benchmarks/results/mnist_models_quick.json: not numbers to quote.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _mnist import run_record

from difflab.apps.demo.datasets import MNIST_BATCH, MNIST_UNET  # the one MNIST recipe (the demo's --data mnist too)
from difflab.apps.demo.run import cached_model, heun_sigmas
from difflab.core.io import write_json
from difflab.data import Dataset, keep_classes, load_mnist
from difflab.metrics import class_accuracy, frechet, frechet_floor, get_classifier
from difflab.models import load
from difflab.nets import UNet
from difflab.sampling import sample, seeded_noise
from difflab.train.contract import loss_divergence
from difflab.train.denoiser import DenoiserConfig, train_denoiser

RESULTS = Path(__file__).parent / "results"
MNIST_LR = 2e-3
# at lr 2e-3 the U-Net is at the edge of stability: on some CPUs `full` diverged near step 1,700 (docs/data.md);
# a run that diverges goes back to its last healthy state with half the learning rate, up to this many times
MNIST_ROLLBACKS = 3
# name -> (classes kept, class-conditional)
MODELS = {"full": (None, True), "0-4": ([0, 1, 2, 3, 4], False), "5-9": ([5, 6, 7, 8, 9], False)}
PROBE_STEPS = 4            # the first step pays one-off costs; the median of the others is the step time
CHECKPOINT_SECONDS = 300   # a checkpoint about every 5 minutes of training


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny budget, few samples, own folders")
    parser.add_argument("--budget-minutes", type=float, default=None, help="training wall time per model (60)")
    parser.add_argument("--train-steps", type=int, default=None, help="steps per model (overrides the budget)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--n", type=int, default=None, help="samples per model for the metrics (1000)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated subset of full,0-4,5-9 (DEFT and distillation need only full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=None, help="run folder (runs/bench/mnist[-quick][-cuda])")
    parser.add_argument("--out", type=Path, default=None, help="summary JSON (results/mnist_models[_quick].json)")
    args = parser.parse_args()
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown or not args.models:
        parser.error(f"--models: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODELS)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    suffix = ("-quick" if args.quick else "") + ("-cuda" if args.device == "cuda" else "")
    args.runs = args.runs or Path("runs/bench") / f"mnist{suffix}"
    args.out = args.out or RESULTS / f"mnist_models{'_quick' if args.quick else ''}.json"
    args.budget_minutes = args.budget_minutes or (10 / 60 if args.quick else 60.0)
    args.n = args.n or (50 if args.quick else 1000)
    args.heun_steps = 4 if args.quick else 18   # NFE = 2·steps − 1
    return args


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())


def new_net(conditional: bool, seed: int) -> UNet:
    torch.manual_seed(seed)   # the initial weights: the same seed gives the same model
    return UNet(num_classes=10 if conditional else 0, **MNIST_UNET)


def denoiser_config(args: argparse.Namespace, train_steps: int, checkpoint_every: int) -> DenoiserConfig:
    return DenoiserConfig(train_steps=train_steps, lr=MNIST_LR, seed=args.seed, device=args.device,
                          checkpoint_every=checkpoint_every, batch_size=MNIST_BATCH, label_dropout=0.1,
                          dataset="mnist", divergence_rollbacks=MNIST_ROLLBACKS)


def probe_step_seconds(net: UNet, data: Dataset, labels, args: argparse.Namespace) -> float:
    """Seconds per optimiser step of this net, batch and device: a throwaway copy trained PROBE_STEPS steps."""
    elapsed = []
    config = denoiser_config(args, PROBE_STEPS, PROBE_STEPS)
    config.log_every = 1
    train_denoiser(copy.deepcopy(net), data.x, labels, config, callback=lambda step: elapsed.append(step.elapsed),
                   progress=False)
    return statistics.median(later - earlier for earlier, later in zip(elapsed[1:], elapsed[2:]))


def plan(folder: Path, net: UNet, data: Dataset, labels, args: argparse.Namespace) -> dict:
    """The run's step count: --train-steps, else the one planned before (a resumed run keeps it), else
    the budget over a probe's step time. Saved to folder/run.json."""
    record = run_record(folder)
    if args.train_steps is not None:
        record["train_steps"] = args.train_steps
    if "step_seconds_probe" not in record:
        record["step_seconds_probe"] = round(probe_step_seconds(net, data, labels, args), 4)
    if "train_steps" not in record:
        record["train_steps"] = max(1, int(args.budget_minutes * 60 / record["step_seconds_probe"]))
    record |= {"budget_minutes": round(args.budget_minutes, 3), "batch_size": MNIST_BATCH, "device": args.device,
               "device_name": device_name(args.device), "torch_threads": torch.get_num_threads()}
    write_json(folder / "run.json", record)
    return record


def train_model(name: str, train: Dataset, args: argparse.Namespace):
    """(denoiser, run record) of one bench model: loaded when finished, else trained (resuming) and saved."""
    classes, conditional = MODELS[name]
    data = keep_classes(train, classes, "mnist")
    labels = data.labels if conditional else None
    folder = args.runs / name
    if (folder / "model" / "config.json").is_file():   # finished: skipped
        print(f"{name}: finished run in {folder}, loaded")
        return load(folder / "model"), run_record(folder)
    net = new_net(conditional, args.seed)
    parameters = sum(p.numel() for p in net.parameters())
    print(f"{name}: U-Net of {parameters:,} parameters, {len(data)} training images")
    record = plan(folder, net, data, labels, args)
    steps = record["train_steps"]
    checkpoint_every = max(1, min(steps, round(CHECKPOINT_SECONDS / record["step_seconds_probe"])))
    config = denoiser_config(args, steps, checkpoint_every)
    print(f"{name}: {steps} steps planned ({record['step_seconds_probe']:.3f} s/step probed, "
          f"checkpoint every {checkpoint_every})")

    def fit():
        result = train_denoiser(net, data.x, labels, config, out_dir=folder / "checkpoints", progress=not args.quick)
        divergence = loss_divergence(result.history)
        if divergence is not None and not args.quick:   # every benchmark on it would measure a broken model
            sys.exit(f"{name}: {divergence}. The model is not saved (its last checkpoint is in "
                     f"{folder / 'checkpoints'}; delete the folder to start afresh)")
        record["final_loss"] = round(result.final_loss, 4)
        record["rollbacks"] = [dataclasses.asdict(rollback) for rollback in result.rollbacks]
        record["resumed_from_step"] = result.start_step   # > 0: train_seconds covers only the steps from there
        if classes is not None:
            result.model.meta["kept_classes"] = classes
        return result.model

    denoiser, seconds = cached_model(folder / "model", fit)
    record |= {"parameters": parameters, "train_seconds": round(seconds, 1)}
    write_json(folder / "run.json", record)
    return denoiser, record


def sample_images(denoiser, n: int, labels, args: argparse.Namespace, batch: int = 250) -> torch.Tensor:
    """n samples [n, 1, 28, 28] on the CPU, Heun from per-sample seeds (independent of `batch`)."""
    sigmas = heun_sigmas(args.heun_steps, 0.002, 80.0)
    denoiser = denoiser.to(args.device)
    chunks = []
    for start in range(0, n, batch):
        seeds = range(args.seed + start, args.seed + min(n, start + batch))
        noise = seeded_noise(seeds, (1, 28, 28), float(sigmas[0]), device=args.device)
        cond = {} if labels is None else {"class_labels": labels[start:start + batch].to(args.device)}
        with torch.no_grad():
            chunks.append(sample(denoiser, noise, sigmas, "heun", **cond).clamp(-1, 1).cpu())
    return torch.cat(chunks)


def evaluate(name: str, denoiser, train: Dataset, test: Dataset, args: argparse.Namespace) -> dict:
    """FD of n samples vs the floor at n; accuracy (full) or in-class fraction (halves); a grid."""
    from difflab.apps.figures import save_image_grid

    classes, conditional = MODELS[name]
    labels = torch.arange(args.n) % 10 if conditional else None
    start = time.perf_counter()
    samples = sample_images(denoiser, args.n, labels, args)
    row = {"sample_seconds": round(time.perf_counter() - start, 1), "n": args.n, "nfe": 2 * args.heun_steps - 1}
    if classes is None:
        row |= {"frechet": frechet("mnist", samples), "frechet_floor": frechet_floor("mnist", args.n),
                "class_accuracy": class_accuracy("mnist", samples, labels)}
        # the null class (no label): the unconditional denoiser that fast_sampling.py benchmarks
        unconditional = sample_images(denoiser, args.n, None, args)
        row["frechet_unconditional"] = frechet("mnist", unconditional)
    else:
        reference = keep_classes(test, classes, "mnist").x
        real = keep_classes(train, classes, "mnist").x
        chosen = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:args.n]
        predicted = get_classifier("mnist").class_probs(samples).argmax(1)
        row |= {"frechet": frechet("mnist", samples, reference),
                "frechet_floor": frechet("mnist", real[chosen], reference),
                "in_class_fraction": float(torch.isin(predicted, torch.tensor(classes)).double().mean())}
    row["ratio_to_floor"] = row["frechet"] / row["frechet_floor"]
    # beside the summary: results/mnist_models_full.png, or next to a --out elsewhere (never over the committed grid)
    save_image_grid(samples[:100], args.out.with_name(f"{args.out.stem}_{name}.png"), ncol=10)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


def print_table(rows: dict) -> None:
    columns = ["model", "parameters", "train_steps", "train_seconds", "device", "n", "frechet", "frechet_floor",
               "ratio_to_floor", "class_accuracy", "in_class_fraction", "frechet_unconditional"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name, row in rows.items():
        print("| " + " | ".join(str(row.get(c, name if c == "model" else "–")) for c in columns) + " |")


def main() -> None:
    args = parse_args()
    train, test = load_mnist("train"), load_mnist("test")
    get_classifier("mnist")   # trained once (about a minute on CPU) and cached, before any timing
    rows = {}
    for name in args.models:
        denoiser, record = train_model(name, train, args)
        keep = ("parameters", "train_steps", "step_seconds_probe", "train_seconds", "final_loss", "device",
                "device_name", "torch_threads")
        rows[name] = {k: record.get(k) for k in keep} | evaluate(name, denoiser, train, test, args)
        print(f"{name}: {rows[name]}")
        write_summary(rows, args)   # after every model: an interrupted run keeps what it measured
    print_table(rows)
    print(f"wrote {args.out}")


def write_summary(rows: dict, args: argparse.Namespace) -> None:
    """Merge this device's rows (one per model evaluated so far) into args.out."""
    summary = json.loads(args.out.read_text()) if args.out.is_file() else {}
    summary |= {"dataset": "mnist", "unet": MNIST_UNET, "batch_size": MNIST_BATCH, "lr": MNIST_LR,
                "divergence_rollbacks": MNIST_ROLLBACKS}
    run = summary.setdefault("runs", {}).setdefault(args.device, {"models": {}})
    run |= {"quick": args.quick, "budget_minutes": round(args.budget_minutes, 3), "runs_folder": str(args.runs)}
    run["models"] |= rows
    write_json(args.out, summary)


if __name__ == "__main__":
    main()
