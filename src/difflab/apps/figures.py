"""Figures: image grids and 2-D scatter plots (matplotlib / PIL), written atomically."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from difflab.core.io import atomic_path


def image_grid(x: Tensor, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """Images [N, C, H, W] in [−1, 1] -> one uint8 grid [rows·(H+pad), ncol·(W+pad), C or none]."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = torch.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    grid = grid.permute(1, 2, 0).numpy()
    return grid[..., 0] if c == 1 else grid


def save_image_grid(x: Tensor, path: str | Path, ncol: int | None = None, scale: int = 4,
                    row_labels: list[str] | None = None) -> Path:
    """Write images [N, C, H, W] in [−1, 1] as one PNG grid (nearest-neighbour upscaled ×scale); row_labels:
    one name per row of the grid, written in a margin at its left."""
    from PIL import Image

    grid = image_grid(x, ncol)
    image = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    if row_labels is not None:
        image = _with_row_labels(image, row_labels, x.shape[-2] + 1, scale)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def _with_row_labels(image, row_labels: list[str], row_pitch: int, scale: int):
    """The grid image with a white margin at its left holding each row's label, centred on the row."""
    from PIL import Image, ImageDraw, ImageFont

    rows = (image.height // scale - 1) // row_pitch
    if len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for a grid of {rows} rows; give one per row")
    font = ImageFont.load_default(size=max(10, 3 * scale))
    margin = 8 + max(ImageDraw.Draw(image).textlength(label, font=font) for label in row_labels)
    labelled = Image.new(image.mode, (image.width + int(margin), image.height), "white")
    labelled.paste(image, (int(margin), 0))
    draw = ImageDraw.Draw(labelled)
    for row, label in enumerate(row_labels):
        centre = (1 + row * row_pitch + row_pitch / 2) * scale
        draw.text((4, centre), label, fill="black", font=font, anchor="lm")
    return labelled


def save_scatter(points: dict[str, Tensor], path: str | Path, title: str = "") -> Path:
    """2-D point clouds {label: [N, 2]} side by side on shared axes, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(3.2 * len(points), 3.2), sharex=True, sharey=True,
                             squeeze=False)
    for ax, (label, pts) in zip(axes[0], points.items()):
        pts = pts.detach().cpu().numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_title(label)
        ax.set_aspect("equal")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure as a PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)
