"""The distillation section of `difflab demo`, and the helpers the benchmark shares with it.

A class-conditional U-Net with label dropout is trained on the demo's image data set (the digits by
default; or read from OUT/models), distilled
into a w-conditioned student (stage 1), then halved from N₀ steps down to 4 (stage 2). The figure
puts the guided teacher (DDIM, N₀ steps, two evaluations per step) beside the 4-step student, one
row per class; the numbers are the classifier's agreement with the requested class and the Fréchet
distance in the features of the data set's digit classifier.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from difflab.apps.demo.datasets import ImageData, image_base
from difflab.core.wrappers import CFGDenoiser
from difflab.distill.samplers import per_sample_generator, run_sampler
from difflab.distill.schedule import student_sigmas
from difflab.sampling.noise import seeded_noise

NUM_CLASSES = 10
# quick: a smaller U-Net and short runs (digits: < 60 s on one core); full: the demo's digits U-Net and batch
# (other data sets: `recipe_for`)
RECIPES = {
    True: {"unet": {"base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1, "attn_resolutions": []},
           "teacher_steps": 150, "batch": 64, "guided_steps": 50, "n0": 16, "round_steps": 30, "n_per_class": 20},
    False: {"unet": {"base_channels": 32, "channel_mults": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [4]},
            "teacher_steps": 500, "batch": 128, "guided_steps": 200, "n0": 16, "round_steps": 100,
            "n_per_class": 100},
}


def recipe_for(data: ImageData, quick: bool) -> dict:
    """RECIPES[quick] for `data`: quick, the small U-Net at its image size; full, the data set's base U-Net,
    batch and base training steps (for the digits both are RECIPES itself)."""
    recipe = dict(RECIPES[bool(quick)])
    if quick:
        recipe["unet"] = {**recipe["unet"], "image_size": data.shape[-1]}
    else:
        recipe |= {"unet": data.unet, "batch": data.batch_size, "teacher_steps": data.steps(False)}
    return recipe


def class_labels_for(n: int, device: str | torch.device = "cpu") -> Tensor:
    """Sample i asks for class i mod 10: [n] long."""
    return torch.arange(n, device=device) % NUM_CLASSES


def guided_samples(model: Callable[..., Tensor], n: int, steps: int, w: float, seed: int = 0,
                   device: str | torch.device = "cpu", stochastic: bool = False, sigma_max: float = 80.0,
                   shape: tuple[int, ...] = (1, 8, 8)) -> Tensor:
    """n class-balanced samples [n, *shape] (digits: [n, 1, 8, 8]) of a model taking (w, class_labels), `steps`
    DDIM steps on the cosine grid; sample i from seed + i (so teacher and student start from the same noise)."""
    seeds = list(range(seed, seed + n))
    sigmas = student_sigmas(steps, sigma_max)
    x = seeded_noise(seeds, tuple(shape), float(sigmas[0]), device=device)
    cond = {"w": torch.full((n,), float(w), device=device), "class_labels": class_labels_for(n, device)}
    with torch.no_grad():
        return run_sampler(model, x, sigmas, stochastic, per_sample_generator(seeds), **cond).cpu()


def evaluate(samples: Tensor, dataset: str = "digits") -> dict:
    """Class accuracy (the classifier of `dataset` agrees with the requested class i mod 10) and Fréchet
    distance (its features, against the test split). samples: [N, 1, S, S]."""
    from difflab.metrics import class_accuracy, frechet

    accuracy = class_accuracy(dataset, samples, class_labels_for(len(samples)))
    return {"accuracy": round(accuracy, 3), "frechet": round(frechet(dataset, samples), 2)}


def classes_by_steps_figure(panels: dict[str, dict[int, Tensor]], path: Path, title: str = "") -> Path:
    """One panel per model: rows = classes 0–9, columns = step counts. panels[name][steps] holds samples of
    classes i mod 10 (the first 10 are used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difflab.apps.figures import image_grid, save_figure

    fig, axes = plt.subplots(1, len(panels), figsize=(1.0 + 1.1 * sum(len(p) for p in panels.values()), 5.2),
                             squeeze=False)
    for ax, (name, by_steps) in zip(axes[0], panels.items()):
        steps = sorted(by_steps)
        cells = torch.stack([by_steps[s][c] for c in range(NUM_CLASSES) for s in steps])   # row-major: class, steps
        side = cells.shape[-1]   # one image and its 1-pixel gap per grid cell
        ax.imshow(image_grid(cells, ncol=len(steps)), cmap="gray", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([side // 2 + (side + 1) * j for j in range(len(steps))], [str(s) for s in steps], fontsize=7)
        ax.set_yticks([side // 2 + (side + 1) * c for c in range(NUM_CLASSES)], [str(c) for c in range(NUM_CLASSES)],
                      fontsize=7)
        ax.set_xlabel("steps", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def train_teacher(recipe: dict, seed: int, device: str, progress: bool = False, dataset: str = "digits") -> nn.Module:
    """A class-conditional U-Net on `dataset`'s train split with label dropout 0.1 (the null class −1 for
    guidance)."""
    from difflab.data import get_dataset
    from difflab.nets import UNet
    from difflab.train.denoiser import DenoiserConfig, train_denoiser

    data = get_dataset(dataset, split="train")
    torch.manual_seed(seed)
    net = UNet(num_classes=NUM_CLASSES, **recipe["unet"])
    config = DenoiserConfig(train_steps=recipe["teacher_steps"], lr=2e-3, seed=seed, device=device,
                            checkpoint_every=recipe["teacher_steps"], batch_size=recipe["batch"], label_dropout=0.1,
                            dataset=dataset)
    return train_denoiser(net, data.x, data.labels, config, progress=progress).model


def distil(teacher: nn.Module, recipe: dict, seed: int, device: str, n_to: int = 4, rounds_dir: Path | None = None,
           progress: bool = False, dataset: str = "digits") -> tuple[nn.Module, nn.Module, float]:
    """(stage-1 student, n_to-step student, seconds): stage 1 then progressive rounds N₀ → n_to, on the
    train split of `dataset`."""
    from difflab.core.fingerprint import fingerprint
    from difflab.data import get_dataset
    from difflab.distill.guided import GuidedDistillConfig, dataset_batches, distill_guided
    from difflab.distill.progressive import ProgressiveDistillConfig, distill_progressive
    from difflab.distill.student import make_student

    data = get_dataset(dataset, split="train")
    batches = dataset_batches(data.x, data.labels)
    base_id = fingerprint(teacher)
    start = time.perf_counter()
    student = make_student(teacher, base_model=base_id, teacher=base_id, dataset=dataset)
    config = GuidedDistillConfig(train_steps=recipe["guided_steps"], lr=1e-3, warmup_steps=20, seed=seed,
                                 device=device, checkpoint_every=recipe["guided_steps"], batch_size=recipe["batch"],
                                 w_range=(0.0, 4.0))
    stage1 = distill_guided(CFGDenoiser(teacher), student, batches, config, progress=progress).model
    config = ProgressiveDistillConfig(from_steps=recipe["n0"], to_steps=n_to,
                                      train_steps_per_round=recipe["round_steps"], lr=3e-4, warmup_steps=10,
                                      seed=seed, device=device, checkpoint_every=recipe["round_steps"],
                                      batch_size=recipe["batch"], w_range=(0.0, 4.0))
    final = distill_progressive(stage1, batches, config, out_dir=rounds_dir, progress=progress).model
    return stage1, final, time.perf_counter() - start


def _cached(folder: Path, build: Callable[[], nn.Module]) -> tuple[nn.Module, bool]:
    from difflab.models import load

    if (folder / "config.json").is_file():
        return load(folder), True
    model = build()
    model.save(folder, overwrite=True)
    return load(folder), False


def demo_section(out: Path, quick: bool, seed: int, device: str, base: dict) -> dict:
    """Train (or load from OUT/models) a class-conditional teacher on the demo's image data set, distil a
    4-step student, write `distill.png` (guided teacher at N₀ DDIM steps vs the 4-step student, w = 2) and
    return the numbers, with the data set's Fréchet floor at the same number of samples.

    base: the demo's base models; only its data set is used (datasets.image_base: the digits by default).
    """
    from difflab.metrics import frechet_floor

    out = Path(out)
    data, _ = image_base(base)
    recipe = recipe_for(data, quick)
    tag = "quick" if quick else "full"
    start = time.perf_counter()
    teacher, teacher_cached = _cached(out / "models" / f"{data.name}-cond-{tag}",
                                      lambda: train_teacher(recipe, seed, device, dataset=data.name))
    teacher = teacher.to(device)
    seconds: dict = {"teacher_train": 0.0 if teacher_cached else round(time.perf_counter() - start, 1)}
    student_folder = out / "models" / f"{data.name}-distill-student-4-{tag}"
    if (student_folder / "config.json").is_file():
        from difflab.models import load
        student, seconds["distillation"] = load(student_folder).to(device), 0.0
    else:
        _, student, distil_seconds = distil(teacher, recipe, seed, device, n_to=4, dataset=data.name)
        student.save(student_folder, overwrite=True)
        seconds["distillation"] = round(distil_seconds, 1)
    n, w, n0 = NUM_CLASSES * recipe["n_per_class"], 2.0, recipe["n0"]
    guided_teacher = CFGDenoiser(teacher)
    shape = data.shape
    rows = {f"teacher DDIM {n0} steps ({2 * n0} NFE)": guided_samples(guided_teacher, n, n0, w, seed, device,
                                                                         shape=shape),
            "teacher DDIM 4 steps (8 NFE)": guided_samples(guided_teacher, n, 4, w, seed, device, shape=shape),
            "student 4 steps (4 NFE)": guided_samples(student, n, 4, w, seed, device, shape=shape),
            "student 4 steps, stochastic": guided_samples(student, n, 4, w, seed, device, stochastic=True,
                                                          shape=shape)}
    metrics = {name: evaluate(samples, data.name) for name, samples in rows.items()}
    panels = {name: {0: samples[:NUM_CLASSES * 6]} for name, samples in list(rows.items())[:3]}
    _samples_figure(panels, out / "distill.png", f"guided {data.name}, w = {w:g}: one row per class")
    floor = round(frechet_floor(data.name, n), 2)
    return {"quick": bool(quick), "w": w, "n_samples": n, "n0": n0, "metrics": metrics, "seconds": seconds,
            "frechet_floor": floor, "figures": ["distill.png"]}


def _samples_figure(panels: dict[str, dict[int, Tensor]], path: Path, title: str) -> Path:
    """Side-by-side grids: rows = classes, 6 samples per class (samples ordered i ↦ class i mod 10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difflab.apps.figures import image_grid, save_figure

    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 4.4), squeeze=False)
    for ax, (name, by) in zip(axes[0], panels.items()):
        samples = by[0]
        per_class = len(samples) // NUM_CLASSES
        order = torch.tensor([c + NUM_CLASSES * j for c in range(NUM_CLASSES) for j in range(per_class)])
        ax.imshow(image_grid(samples[order], ncol=per_class), cmap="gray", interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


__all__ = ["demo_section", "guided_samples", "evaluate", "classes_by_steps_figure", "train_teacher", "distil",
           "RECIPES", "recipe_for"]
