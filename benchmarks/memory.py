"""Claim: `difflab sample` memory is flat in the number of samples (peak RSS for 20,000 samples within
1.2x of that for 1,000), because samples are streamed to the .npz a batch at a time.

Each run is a fresh `python -m difflab.apps.cli.app sample` subprocess; its peak RSS is read from the kernel's
rusage for that child (os.wait4), so runs do not see each other's peaks. Models, made on the spot:
  mixture2d  the analytic 2-D GaussianMixture (tiny samples: measures the fixed cost)
  mlp3072    an EDM-preconditioned MLP on 3,072-dim vectors (a 3x32x32 image's size; random weights):
             20,000 samples are 246 MB of float32, so holding them all would show
  digits     (--digits) a small U-Net on 1x8x8 digits-shaped data (random weights; ~10 min on 2 cores)
Writes benchmarks/results/memory.json.

    OMP_NUM_THREADS=2 python benchmarks/memory.py [--digits]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from difflab import GaussianMixture
from difflab.core.wrappers import EDMDenoiser
from difflab.nets import MLP, UNet

SIZES = (1_000, 20_000)
TARGET_RATIO = 1.2


def make_models(folder: Path, digits: bool) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Model folders by name -> (path, per-sample shape)."""
    torch.manual_seed(0)
    models = {"mixture2d": (folder / "mixture2d", (2,)), "mlp3072": (folder / "mlp3072", (3072,))}
    GaussianMixture([[-2.0, 0.0], [2.0, 1.0]], stds=[0.5, 0.8], weights=[0.4, 0.6]).save(models["mixture2d"][0])
    EDMDenoiser(MLP(dim=3072, hidden=64, depth=2, zero_init_output=False), sigma_data=0.5,
                data_shape=(3072,)).save(models["mlp3072"][0])
    if digits:
        models["digits"] = (folder / "digits", (1, 8, 8))
        EDMDenoiser(UNet(in_channels=1, base_channels=8), sigma_data=0.5, data_shape=(1, 8, 8)).save(folder / "digits")
    return models


def peak_rss_of_sample(model: Path, n: int, out: Path, nfe: int, batch_size: int) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one `difflab sample` subprocess."""
    cmd = [sys.executable, "-m", "difflab.apps.cli.app", "sample", "--model", str(model), "--solver", "euler",
           "--nfe", str(nfe), "--n", str(n), "--batch-size", str(batch_size), "--out", str(out),
           "--device", "cpu", "--force"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
    kib = usage.ru_maxrss if platform.system() == "Linux" else usage.ru_maxrss / 1024   # macOS: bytes
    return kib / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", action="store_true", help="also a digits-shaped U-Net (slow on CPU)")
    parser.add_argument("--nfe", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, shape) in make_models(Path(tmp), args.digits).items():
            peaks, seconds = {}, {}
            for n in SIZES:
                out = Path(tmp) / f"{name}_{n}.npz"
                peaks[n], seconds[n] = peak_rss_of_sample(model, n, out, args.nfe, args.batch_size)
                out.unlink()
                print(f"{name}: n={n} peak RSS {peaks[n]:.1f} MiB, {seconds[n]:.1f} s", flush=True)
            output_mib = 4 * SIZES[-1] * math.prod(shape) / 2**20
            rows.append({"model": name, "sample_shape": list(shape),
                         **{f"peak_rss_mib_{n}": round(peaks[n], 1) for n in SIZES},
                         **{f"seconds_{n}": round(seconds[n], 2) for n in SIZES},
                         f"output_mib_{SIZES[-1]}": round(output_mib, 1),
                         "ratio": round(peaks[SIZES[-1]] / peaks[SIZES[0]], 3)})

    header = (f"{'model':<10} {'shape':<10} {'RSS 1k MiB':>11} {'RSS 20k MiB':>12} {'ratio':>6} "
              f"{'20k output MiB':>15} {'s 1k':>6} {'s 20k':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<10} {'x'.join(map(str, r['sample_shape'])):<10} {r['peak_rss_mib_1000']:>11.1f} "
              f"{r['peak_rss_mib_20000']:>12.1f} {r['ratio']:>6.3f} {r['output_mib_20000']:>15.1f} "
              f"{r['seconds_1000']:>6.1f} {r['seconds_20000']:>6.1f}")
    worst = max(r["ratio"] for r in rows)
    print(f"worst ratio {worst:.3f} (target <= {TARGET_RATIO})")
    report = {"claim": f"peak RSS of `difflab sample` for {SIZES[-1]} vs {SIZES[0]} samples within {TARGET_RATIO}x",
              "target_ratio": TARGET_RATIO, "worst_ratio": worst, "passed": worst <= TARGET_RATIO,
              "solver": "euler", "nfe": args.nfe, "batch_size": args.batch_size,
              "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "memory.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out_dir / 'memory.json'}")


if __name__ == "__main__":
    main()
