"""Benchmark: guided distillation on digits (Meng et al. 2023), student vs guided teacher.

Trains (or reads from --cache) a class-conditional digits U-Net with label dropout, distils it
(stage 1: one w-conditioned student; stage 2: progressive halving from N₀ to 1 step), and prints,
for w ∈ {0, 1, 2, 4}: the Fréchet distance (digit-classifier features, against the held-out split)
and the class accuracy (the classifier agrees with the requested class) of
  - the student at 1, 2, 4, 8 steps (1 evaluation per step), and
  - the guided teacher with DDIM at the same steps and at 256 steps (2 evaluations per step),
with the targets of issue 6 (4-step student within 1.2× of the 256-step teacher's Fréchet distance,
and at most 0.5× the 4-step DDIM teacher's), the total distillation time, and a figure of classes ×
steps for teacher and student. Writes benchmarks/results/distill.json (distill_quick.json with
--quick) and the figure beside it. All samplers start from the same per-sample seeded noise.

    python benchmarks/distill.py [--quick] [--cache DIR] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from difflab import CFGDenoiser, load
from difflab.apps.demo.distill import RECIPES, classes_by_steps_figure, evaluate, guided_samples, train_teacher
from difflab.apps.demo.run import cached_model
from difflab.core.fingerprint import fingerprint
from difflab.data import load_digits
from difflab.distill import (
    GuidedDistillConfig,
    ProgressiveDistillConfig,
    dataset_batches,
    distill_guided,
    distill_progressive,
    make_student,
)
from difflab.metrics import digits_frechet_floor

# The full run fits ~30 minutes on 2 CPU cores: N₀ = 32 (five halving rounds to 1 step) rather than the
# paper's 256 (eight rounds), 500 samples; the reference is still the guided teacher at 256 DDIM steps.
FULL = {**RECIPES[False], "teacher_steps": 800, "guided_steps": 600, "n0": 32, "round_steps": 250,
        "n_per_class": 50, "teacher_reference_steps": 256}
QUICK = {**RECIPES[True], "n0": 16, "round_steps": 20, "n_per_class": 10, "teacher_reference_steps": 64}
STEPS, WEIGHTS = (1, 2, 4, 8), (0.0, 1.0, 2.0, 4.0)


def distil_all(teacher, recipe: dict, cache: Path, seed: int, device: str) -> tuple[dict[int, object], float]:
    """Stage 1 then progressive rounds N₀ → 1 (resumed from cache/rounds); {steps: student}, seconds."""
    data = load_digits("train")
    batches = dataset_batches(data.x, data.labels)
    base_id = fingerprint(teacher)

    def stage1():
        student = make_student(teacher, base_model=base_id, teacher=base_id, dataset="digits")
        config = GuidedDistillConfig(train_steps=recipe["guided_steps"], lr=1e-3, warmup_steps=50, seed=seed,
                                     device=device, checkpoint_every=max(recipe["guided_steps"] // 4, 1),
                                     batch_size=recipe["batch"], w_range=(0.0, 4.0))
        result = distill_guided(CFGDenoiser(teacher), student, batches, config, out_dir=cache / "stage1.checkpoints")
        return result.model

    student, stage1_seconds = cached_model(cache / "stage1", stage1)
    config = ProgressiveDistillConfig(from_steps=recipe["n0"], to_steps=1, train_steps_per_round=recipe["round_steps"],
                                      lr=3e-4, warmup_steps=10, seed=seed, device=device,
                                      checkpoint_every=max(recipe["round_steps"] // 2, 1), batch_size=recipe["batch"],
                                      w_range=(0.0, 4.0))
    start = time.perf_counter()
    distill_progressive(student.to(device), batches, config, out_dir=cache / "rounds")
    seconds = stage1_seconds + time.perf_counter() - start
    students = {n: load(cache / "rounds" / f"steps-{n:04d}").to(device) for n in STEPS if n < recipe["n0"]}
    return students, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small smoke run (minutes on one core)")
    parser.add_argument("--cache", type=Path, default=None, help="model cache (default runs/bench-distill[-quick])")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    recipe, tag = (QUICK, "_quick") if args.quick else (FULL, "")
    cache = args.cache or Path("runs") / f"bench-distill{tag.replace('_', '-')}"
    out = args.out or Path(__file__).parent / "results" / f"distill{tag}.json"

    teacher, teacher_seconds = cached_model(cache / "teacher",
                                            lambda: train_teacher(recipe, args.seed, args.device, True))
    teacher = teacher.to(args.device)
    students, distill_seconds = distil_all(teacher, recipe, cache, args.seed, args.device)
    guided_teacher = CFGDenoiser(teacher)
    n = 10 * recipe["n_per_class"]
    ref_steps = recipe["teacher_reference_steps"]
    rows, figure = [], {"teacher (DDIM, guided)": {}, "student": {}}
    for w in WEIGHTS:
        for steps in (*STEPS, ref_steps):
            samples = guided_samples(guided_teacher, n, steps, w, args.seed, args.device)
            rows.append({"model": "teacher DDIM", "w": w, "steps": steps, "nfe": 2 * steps, **evaluate(samples)})
            if w == 2.0 and steps in STEPS:
                figure["teacher (DDIM, guided)"][steps] = samples[:10]
        for steps, student in sorted(students.items()):
            for stochastic in (False, True):
                if stochastic and steps < 2:
                    continue
                samples = guided_samples(student, n, steps, w, args.seed, args.device, stochastic=stochastic)
                rows.append({"model": "student" + (" (stochastic)" if stochastic else ""), "w": w, "steps": steps,
                             "nfe": steps, **evaluate(samples)})
                if w == 2.0 and not stochastic:
                    figure["student"][steps] = samples[:10]

    def fd(model, w, steps):
        return next(r["frechet"] for r in rows if r["model"] == model and r["w"] == w and r["steps"] == steps)

    targets = {}
    for w in WEIGHTS:
        if 4 in students:
            student4 = fd("student", w, 4)
            teacher_ref = fd("teacher DDIM", w, ref_steps)
            teacher4 = fd("teacher DDIM", w, 4)
            targets[str(w)] = {"student4_over_teacher_ref": round(student4 / teacher_ref, 2),
                               "student4_over_teacher4": round(student4 / teacher4, 2),
                               "met": student4 <= 1.2 * teacher_ref and student4 <= 0.5 * teacher4}
    print("| model | w | steps | NFE | Fréchet | class accuracy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['w']:g} | {r['steps']} | {r['nfe']} | {r['frechet']:.2f} | {r['accuracy']:.3f} |")
    print(f"\nFréchet floor (real digits, n={n}): {digits_frechet_floor(n):.2f}")
    print(f"targets (4-step student vs teacher at {ref_steps} and 4 steps): {json.dumps(targets)}")
    print(f"distillation seconds: {distill_seconds:.1f} (teacher training {teacher_seconds:.1f})")
    figure_path = out.with_name(f"distill{tag}_classes_by_steps.png")
    classes_by_steps_figure(figure, figure_path, "guided digits, w = 2: rows = classes, columns = steps")
    result = {"quick": args.quick, "recipe": recipe, "n_samples": n, "frechet_floor": round(digits_frechet_floor(n), 2),
              "rows": rows, "targets": targets, "teacher_reference_steps": ref_steps,
              "distill_seconds": round(distill_seconds, 1), "teacher_train_seconds": round(teacher_seconds, 1),
              "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "device": args.device, "figure": figure_path.name}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} and {figure_path}")


if __name__ == "__main__":
    main()
