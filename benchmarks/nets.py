"""Benchmark: the cU-Net against the default digits U-Net, trained on equal terms.

Both networks are trained by the same loop (train.loop.fit), objective (EDM loss), σ sampling,
seed, number of steps and batch; then, side by side:

- parameters and FLOPs of one forward pass of one 8×8 image (nets/flops.py, attention included);
- wall time of one forward pass at batch 256 and of one training step (medians of interleaved
  repeats, so a load spike on a shared machine hits both networks), on this CPU at the given
  thread count, and the wall time of each whole training run;
- Fréchet distance (digit-classifier features) of N samples (Heun, 35 NFE, per-sample seeds)
  after equal training steps, and after equal wall time: the network that is slower per step
  is trained again, from scratch, for steps · t_fast / t_slow steps (t: median step time),
  which fit into the time the faster network took for its steps;
- one-step denoising PSNR of D(x0 + σε; σ) on the held-out digits at σ ∈ {0.1, 0.2, 0.5}
  (one call; no best-along-a-trajectory oracle).

Prints a table and writes benchmarks/results/nets.json (nets_quick.json with --quick).

    python benchmarks/nets.py [--quick] [--steps N] [--batch-size B] [--n N] [--threads T]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from difflab.apps.demo.cunet import cost_table, forward_seconds, one_step_psnr
from difflab.apps.demo.run import DIGITS_BATCH, DIGITS_STEPS, DIGITS_UNET, heun_sigmas
from difflab.core.wrappers import EDMDenoiser
from difflab.data import load_digits
from difflab.metrics import digits_frechet, digits_frechet_floor
from difflab.nets import CUNet, UNet
from difflab.nets.flops import count_flops, example_inputs
from difflab.sampling import sample, seeded_noise
from difflab.train.denoiser import DenoiserConfig, edm_loss, train_denoiser

NETS = {"unet": lambda: UNet(**DIGITS_UNET), "cunet": lambda: CUNet()}


def train(name: str, steps: int, args) -> dict:
    """Train network `name` for `steps` steps; returns the EMA denoiser and the run's wall time."""
    torch.manual_seed(args.seed)  # the same initialisation draw for a given network
    config = DenoiserConfig(train_steps=steps, seed=args.seed, device="cpu", checkpoint_every=steps,
                            batch_size=args.batch_size, dataset="digits")
    start = time.perf_counter()
    result = train_denoiser(NETS[name](), load_digits("train").x, config=config, progress=False)
    seconds = time.perf_counter() - start
    return {"denoiser": result.model, "steps": steps, "train_seconds": seconds, "final_loss": result.final_loss}


def train_step_seconds(nets: dict, batch_size: int, repeats: int, seed: int) -> dict[str, float]:
    """Median wall time of one training step (EDM loss, backward, Adam) per network, the networks
    taking turns after one warm-up step each, so load spikes on a shared machine hit both alike."""
    x0 = load_digits("train").x[:batch_size]
    steps = {}
    for name, net in nets.items():
        denoiser = EDMDenoiser(copy.deepcopy(net).train(), sigma_data=0.5)
        steps[name] = (denoiser, torch.optim.Adam(denoiser.parameters(), lr=1e-4))
    times: dict[str, list[float]] = {name: [] for name in nets}
    generator = torch.Generator().manual_seed(seed)
    for round_index in range(repeats + 1):
        for name, (denoiser, optimiser) in steps.items():
            start = time.perf_counter()
            optimiser.zero_grad()
            edm_loss(denoiser, x0, generator).backward()
            optimiser.step()
            if round_index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


@torch.no_grad()
def frechet(denoiser, n: int, seed: int) -> float:
    sigmas = heun_sigmas(18, 0.002, 80.0)
    x = sample(denoiser, seeded_noise(range(seed, seed + n), (1, 8, 8), float(sigmas[0])), sigmas, "heun")
    return digits_frechet(x)


def print_table(rows: dict[str, dict], title: str) -> None:
    keys = list(next(iter(rows.values())))
    print(f"\n{title}\n| net | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(str(row[k]) for k in keys) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps and samples: checks the script runs")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {DIGITS_STEPS}; quick 40)")
    parser.add_argument("--batch-size", type=int, default=DIGITS_BATCH)
    parser.add_argument("--n", type=int, default=None,
                        help="samples for the Fréchet distance (default 1000; quick 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    steps = args.steps or (40 if args.quick else DIGITS_STEPS)
    n = args.n or (300 if args.quick else 1000)
    results_dir = Path(__file__).parent / "results"
    out = args.out or results_dir / ("nets_quick.json" if args.quick else "nets.json")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    nets = {name: build().eval() for name, build in NETS.items()}
    costs = cost_table(nets, "unet")
    for name, net in nets.items():  # forward + backward of one training batch
        x, c_noise = example_inputs(net.train(), args.batch_size)
        costs[name]["flops_per_train_step"] = count_flops(net, x, c_noise, backward=True)
    forward = forward_seconds({k: v.eval() for k, v in nets.items()}, 256, repeats=3 if args.quick else 9)
    step_seconds = train_step_seconds(nets, args.batch_size, repeats=3 if args.quick else 9, seed=args.seed)

    runs = {name: train(name, steps, args) for name in NETS}
    faster, slower = sorted(runs, key=step_seconds.get)
    equal_time_steps = max(1, round(steps * step_seconds[faster] / step_seconds[slower]))
    equal_time_run = train(slower, equal_time_steps, args)

    test_x = load_digits("test").x
    rows = {}
    for name, run in runs.items():
        rows[name] = {
            "parameters": costs[name]["parameters"], "params_ratio": costs[name]["parameters_ratio"],
            "flops_per_forward": costs[name]["flops_per_forward"], "flops_ratio": costs[name]["flops_ratio"],
            "flops_per_train_step": costs[name]["flops_per_train_step"],
            "forward_s_b256": round(forward[name], 4),
            "train_step_s": round(step_seconds[name], 4),
            "train_run_s": round(run["train_seconds"], 1),
            "frechet_equal_steps": round(frechet(run["denoiser"], n, args.seed), 2),
            "equal_time_steps": equal_time_steps if name == slower else steps,
            "frechet_equal_time": None,
            **{f"psnr_{k}": round(v, 2) for k, v in one_step_psnr(run["denoiser"], test_x, seed=args.seed).items()},
            "final_loss": round(run["final_loss"], 4),
        }
    rows[faster]["frechet_equal_time"] = rows[faster]["frechet_equal_steps"]
    rows[slower]["frechet_equal_time"] = round(frechet(equal_time_run["denoiser"], n, args.seed), 2)

    ratios = {"params": rows["cunet"]["params_ratio"], "flops": rows["cunet"]["flops_ratio"],
              "forward_time_b256": round(forward["cunet"] / forward["unet"], 3),
              "train_step_time": round(step_seconds["cunet"] / step_seconds["unet"], 3),
              "frechet_equal_steps": round(rows["cunet"]["frechet_equal_steps"]
                                           / rows["unet"]["frechet_equal_steps"], 3),
              "frechet_equal_time": round(rows["cunet"]["frechet_equal_time"]
                                          / rows["unet"]["frechet_equal_time"], 3)}
    report = {"quick": args.quick, "steps": steps, "batch_size": args.batch_size, "n_samples": n, "seed": args.seed,
              "frechet_floor": round(digits_frechet_floor(n), 2), "cunet_over_unet": ratios, "nets": rows,
              "unet_config": nets["unet"].config, "cunet_config": nets["cunet"].config,
              "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "command": "python benchmarks/nets.py" + (" --quick" if args.quick else "")}
    print_table(rows, f"digits, {steps} steps, batch {args.batch_size}, {n} samples "
                      f"(Fréchet floor {report['frechet_floor']}), {torch.get_num_threads()} threads")
    print_table({"cunet / unet": ratios}, "ratios")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
