"""Benchmark: the default digits U-Net, trained with the default recipe on this machine.

Prints a table and writes benchmarks/results/train_digits.json: parameters, steps, wall time, and
the Fréchet distance (digit-classifier features) of 1,000 samples (Heun, 35 NFE) next to the
real-data floor at the same n (1,000 training images against the held-out split).

    python benchmarks/train_digits.py [--steps N] [--batch-size B] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from difflab.apps.demo.run import DIGITS_BATCH, DIGITS_STEPS, DIGITS_UNET, heun_sigmas
from difflab.data import load_digits
from difflab.metrics import digits_frechet, digits_frechet_floor
from difflab.nets import UNet
from difflab.sampling import sample, seeded_noise
from difflab.train.denoiser import DenoiserConfig, train_denoiser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=DIGITS_STEPS)
    parser.add_argument("--batch-size", type=int, default=DIGITS_BATCH)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_digits.json")
    args = parser.parse_args()

    data = load_digits("train")
    torch.manual_seed(args.seed)
    net = UNet(**DIGITS_UNET)
    config = DenoiserConfig(train_steps=args.steps, seed=args.seed, device="cpu", checkpoint_every=args.steps,
                            batch_size=args.batch_size, dataset="digits")
    start = time.perf_counter()
    result = train_denoiser(net, data.x, config=config)
    denoiser = result.model
    train_seconds = time.perf_counter() - start

    sigmas = heun_sigmas(18, 0.002, 80.0)
    start = time.perf_counter()
    with torch.no_grad():
        x = sample(denoiser, seeded_noise(range(args.n), (1, 8, 8), float(sigmas[0])), sigmas, "heun")
    sample_seconds = time.perf_counter() - start
    fd, floor = digits_frechet(x), digits_frechet_floor(args.n)
    row = {"parameters": sum(p.numel() for p in net.parameters()), "steps": args.steps,
           "batch_size": args.batch_size, "train_seconds": round(train_seconds, 1),
           "sample_seconds_1000_heun35": round(sample_seconds, 1), "n": args.n,
           "frechet": round(fd, 2), "frechet_floor": round(floor, 2), "ratio_to_floor": round(fd / floor, 2),
           "final_loss": round(result.final_loss, 4), "torch_threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(), "unet": DIGITS_UNET}
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(str(v) for v in row.values()) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
