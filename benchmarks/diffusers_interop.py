"""Claim: `DifflabScheduler` costs about what diffusers' own multistep schedulers cost per step (goal ≤ 1.5×
their scheduler overhead), and gives the same samples on the same grid.

Per-step scheduler overhead: the seconds a pipeline-shaped loop (`scale_model_input`, `step`) spends in the
scheduler, divided by the steps, with the model replaced by a precomputed output (no model time), on a
Stable Diffusion-sized latent [1, 4, 64, 64] float32, CPU. `set_timesteps` is timed apart (once per image).
Pairs, on the same Karras grid ending at σ = 0 (`final_sigmas_type="zero"`):
  difflab dpmpp_2m  vs  DPMSolverMultistepScheduler(use_karras_sigmas=True)
  difflab unipc     vs  UniPCMultistepScheduler(use_karras_sigmas=True, solver_order=3)
at 10, 50, 200 and 1000 steps. Agreement: the max abs difference of the final samples of the two schedulers
from the same noise, with a deterministic ε-model that ignores t (diffusers rounds its Karras timesteps to
integers, difflab keeps them fractional; the solvers' maths are compared on identical σ grids).

    OMP_NUM_THREADS=1 python benchmarks/diffusers_interop.py [--quick] [--repeats 3]

Prints a table and writes benchmarks/results/diffusers_interop.json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from difflab.core.io import write_json
from difflab.interop.diffusers.scheduler import DifflabScheduler

SD_TABLE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
PAIRS = {
    "dpmpp_2m": lambda: DPMSolverMultistepScheduler(**SD_TABLE, use_karras_sigmas=True, final_sigmas_type="zero"),
    "unipc": lambda: UniPCMultistepScheduler(**SD_TABLE, use_karras_sigmas=True, final_sigmas_type="zero",
                                             solver_order=3),
}
SHAPE = (1, 4, 64, 64)


def difflab_scheduler(solver: str) -> DifflabScheduler:
    return DifflabScheduler(**SD_TABLE, solver=solver, grid="karras", final_sigmas_type="zero")


def time_loop(scheduler, steps: int, repeats: int) -> tuple[float, float]:
    """(seconds of set_timesteps, seconds of scheduler work per step), best of `repeats`."""
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    output = 0.1 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    best_set, best_step = float("inf"), float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        scheduler.set_timesteps(steps)
        best_set = min(best_set, time.perf_counter() - tic)
        x = sample * scheduler.init_noise_sigma
        tic = time.perf_counter()
        for t in scheduler.timesteps:
            x = scheduler.step(output, t, scheduler.scale_model_input(x, t)).prev_sample
        best_step = min(best_step, (time.perf_counter() - tic) / steps)
    return best_set, best_step


def final_sample(scheduler, steps: int) -> torch.Tensor:
    """The loop with a deterministic ε-model that ignores t: ε̂(x_vp) = tanh(x_vp)."""
    scheduler.set_timesteps(steps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(torch.tanh(scheduler.scale_model_input(x, t)), t, x).prev_sample
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 and 50 steps only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "diffusers_interop.json")
    args = parser.parse_args()
    step_counts = [10, 50] if args.quick else [10, 50, 200, 1000]
    rows = []
    for solver, reference in PAIRS.items():
        for steps in step_counts:
            ours = difflab_scheduler(solver)
            theirs = reference()
            ours_set, ours_step = time_loop(ours, steps, args.repeats)
            theirs_set, theirs_step = time_loop(theirs, steps, args.repeats)
            a, b = final_sample(difflab_scheduler(solver), steps), final_sample(theirs, steps)
            rows.append({"solver": solver, "steps": steps, "difflab_step_s": ours_step, "diffusers_step_s": theirs_step,
                         "step_ratio": ours_step / theirs_step, "difflab_set_timesteps_s": ours_set,
                         "diffusers_set_timesteps_s": theirs_set, "max_abs_diff": float((a - b).abs().max()),
                         "sample_scale": float(b.abs().max())})
    print(f"{'solver':10} {'steps':>5} {'difflab µs/step':>16} {'diffusers µs/step':>18} {'ratio':>6} "
          f"{'set_timesteps ms (dl/df)':>25} {'max |Δx|':>10}")
    for r in rows:
        print(f"{r['solver']:10} {r['steps']:5d} {1e6 * r['difflab_step_s']:16.1f} {1e6 * r['diffusers_step_s']:18.1f} "
              f"{r['step_ratio']:6.2f} {1e3 * r['difflab_set_timesteps_s']:12.2f} / "
              f"{1e3 * r['diffusers_set_timesteps_s']:<10.2f} {r['max_abs_diff']:10.2e}")
    write_json(args.out, {"shape": list(SHAPE), "dtype": "float32", "device": "cpu",
                          "torch_threads": torch.get_num_threads(), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
