"""The DPS step-size sweep behind benchmarks/deft.py's MNIST_DPS_ZETA: PSNR of DPS (Heun, 19 NFE, σ_y = 0.05) on the
first 32 (class-interleaved) MNIST test digits, for each task and step size ζ. Needs the `full` bench model.

    OMP_NUM_THREADS=2 python benchmarks/dps_zeta_mnist.py [--runs runs/bench/mnist]   # about 3 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _mnist import load_bench_models  # noqa: E402
from deft import SIGMA_Y, TASKS  # noqa: E402

from difflab.condition.reconstruct import make_denoiser, make_operator, psnr, reconstruct, simulate  # noqa: E402
from difflab.data import load_mnist  # noqa: E402

ZETAS = (0.3, 1.0, 3.0, 10.0, 30.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/bench/mnist"))
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--nfe", type=int, default=19)
    args = parser.parse_args()
    base = load_bench_models(args.runs, ("full",))["full"].requires_grad_(False)
    truth = load_mnist("test").x[:args.n]
    shape = tuple(truth.shape[1:])
    print("| task | " + " | ".join(f"ζ = {z:g}" for z in ZETAS) + " |\n|---|" + "---|" * len(ZETAS))
    for task, (name, options) in TASKS["mnist"].items():
        operator, y = simulate(make_operator(name, shape, sigma_y=SIGMA_Y, **options), truth, 0)
        cells = []
        for zeta in ZETAS:
            start = time.perf_counter()
            denoiser = make_denoiser("dps", base, operator, None, zeta=zeta, weight=1.0)
            x = reconstruct(denoiser, y, range(args.n), shape, "heun", args.nfe, conditional=True)
            cells.append(f"{float(psnr(x, truth).mean()):.2f}")
            print(f"  {task} ζ = {zeta:g}: {cells[-1]} dB ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        print(f"| {task} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
