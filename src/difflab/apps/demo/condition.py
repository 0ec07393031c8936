"""The demo's inverse-problems section: digit inpainting (and ×2 super-resolution) on the demo's image
data set with DEFT (fitted on the spot), DPS, ΠGDM and the unconditional floor at equal solver steps."""
from __future__ import annotations

import time
from pathlib import Path

from torch import Tensor

from difflab.apps.demo.datasets import DIGITS, ImageData, image_base
from difflab.condition.deft import DEFTConfig, HNetwork, fit_deft, load_hnet, parameter_fraction
from difflab.condition.reconstruct import make_denoiser, make_operator, psnr, reconstruct, simulate, ssim, summarise
from difflab.core.errors import AddonMismatchError, ModelFormatError

COLUMNS = ("measurement", "DEFT", "DPS", "ΠGDM", "unconditional", "truth")
METHOD_LABELS = {"deft": "DEFT", "dps": "DPS", "pigdm": "ΠGDM", "uncond": "unconditional"}
# (images reconstructed, DEFT fitting steps, fitting batch, NFE): quick / full
SIZES = {True: (12, 80, 32, 9), False: (64, 400, 64, 19)}


def cached_hnet(folder: Path, base, operator, x0_data: Tensor, steps: int, batch_size: int, seed: int,
                device: str) -> tuple[HNetwork, float]:
    """The h-network in `folder` if it was fitted for this base and operator, else fitted now and saved."""
    try:
        return load_hnet(folder, base=base, operator=operator, device=device), 0.0
    except (ModelFormatError, AddonMismatchError):
        pass
    start = time.perf_counter()
    config = DEFTConfig(train_steps=steps, batch_size=batch_size, seed=seed, device=device, checkpoint_every=steps)
    hnet = fit_deft(base, operator, x0_data.to(device), config).model
    seconds = time.perf_counter() - start
    hnet.save(folder, overwrite=True)
    return hnet, seconds


def save_comparison(columns: dict[str, Tensor], path: Path, title: str = "",
                    row_labels: list[str] | None = None) -> Path:
    """Images [N, 1, H, W] per column label, one digit per row, as a PNG with column titles; row_labels: one
    name per row (N), written at the left of the first column; a long title wraps to the figure's width."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difflab.apps.figures import save_figure

    n_rows = min(len(v) for v in columns.values())
    if row_labels is not None and len(row_labels) != n_rows:
        raise ValueError(f"{len(row_labels)} row labels for {n_rows} rows; give one per row")
    width = 1.1 * len(columns) + (0.9 if row_labels else 0.0)
    fig, axes = plt.subplots(n_rows, len(columns), figsize=(width, 1.1 * n_rows + 0.6), squeeze=False,
                             layout="constrained")   # makes room for the suptitle, unlike tight_layout
    for col, (label, images) in enumerate(columns.items()):
        for row in range(n_rows):
            ax = axes[row][col]
            ax.imshow(images[row, 0].detach().cpu().clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=8)
            if col == 0 and row_labels:
                ax.set_ylabel(row_labels[row], fontsize=7)
    if title:   # about 13 characters of 9-point text per inch
        fig.suptitle(textwrap.fill(title, width=max(20, int(13 * width))), fontsize=9)
    return save_figure(fig, path, dpi=100)


def run_task(base, task: str, operator_options: dict, n: int, fit_steps: int, batch_size: int, solver: str,
             nfe: int, seed: int, device: str, cache: Path, data: ImageData = DIGITS) -> tuple[dict, dict[str, Tensor]]:
    """Fit (or reuse) DEFT for one task, reconstruct n held-out images of `data` with every method; metrics and
    images. The h-network is cached in cache/NAME-deft-TASK-STEPS (NAME: the data set's)."""
    operator = make_operator(task, data.shape, **operator_options)
    hnet, fit_seconds = cached_hnet(cache / f"{data.name}-deft-{task}-{fit_steps}", base, operator,
                                    data.load("train").x, fit_steps, batch_size, seed, device)
    truth = data.load("test").x[:n].to(device)
    batch_operator, y = simulate(operator, truth, seed)
    images = {"measurement": batch_operator.image_input(y) if batch_operator.image_like else y}
    metrics: dict = {"fit_steps": fit_steps, "fit_seconds": round(fit_seconds, 2),
                     "hnet_fraction_of_base": round(parameter_fraction(hnet, base), 4), "methods": {}}
    for method in ("deft", "dps", "pigdm", "uncond"):
        denoiser = make_denoiser(method, base, batch_operator, hnet)
        start = time.perf_counter()
        x = reconstruct(denoiser, y, range(seed, seed + n), data.shape, solver, nfe, conditional=method != "uncond")
        seconds = time.perf_counter() - start
        images[METHOD_LABELS[method]] = x
        metrics["methods"][method] = {"psnr": summarise(psnr(x, truth)), "ssim": summarise(ssim(x, truth)),
                                      "seconds_per_image": round(seconds / n, 5)}
    images["truth"] = truth
    return metrics, images


def demo_section(out: Path, quick: bool, seed: int, device: str, base: dict) -> dict:
    """Digit inpainting (right half hidden) and, unless quick, ×2 super-resolution, σ_y = 0.05.

    base: {"data": an ImageData (default the digits), NAME: an EDMDenoiser on its images, "NAME_dir": its
    folder}, e.g. {"digits": a denoiser on [1, 8, 8], "digits_dir": ...}. Writes one figure per task into
    `out`; returns PSNR / SSIM / timing per method (JSON-serialisable), figure names under "figures".
    Quick: inpainting only, DEFT fitted for 80 steps, 12 images, Heun at 9 NFE (digits: < 40 s on one
    core); full: 400 fitting steps, 64 images, Heun at 19 NFE (SIZES).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data, denoiser = image_base(base)
    denoiser = denoiser.to(device).eval().requires_grad_(False)
    tasks = {"inpaint": {"mask": "box", "fraction": 0.5}} if quick else \
        {"inpaint": {"mask": "box", "fraction": 0.5}, "superres": {"factor": 2}}
    n, fit_steps, batch_size, nfe = SIZES[bool(quick)]
    solver = "heun"
    result: dict = {"solver": solver, "nfe": nfe, "n_images": n, "sigma_y": 0.05, "tasks": {}, "figures": []}
    for task, options in tasks.items():
        metrics, images = run_task(denoiser, task, {"sigma_y": 0.05, **options}, n, fit_steps, batch_size, solver,
                                   nfe, seed, device, out / "models", data)
        figure = f"condition_{task}.png"
        save_comparison({k: v[:6] for k, v in images.items()}, out / figure,
                        f"{task}: {solver}, {nfe} NFE for every method")
        result["tasks"][task] = metrics
        result["figures"].append(figure)
    return result


__all__ = ["demo_section", "run_task", "save_comparison", "cached_hnet", "COLUMNS"]
