"""Figure: digits sample grids at NFE 3, 5 and 10 for a few solvers and AMED, from the same noise.

Uses the digits U-Net cached by benchmarks/solvers.py (runs/bench/digits; trained with the demo
recipe if missing). Writes benchmarks/results/solver_grids.png: one row per solver, one column per
NFE, 16 samples each, next to the 1,000-step Heun reference. The AMED rows (AMED-Solver and
AMED-Plugin on iPNDM, fitted here: 2,048 trajectories, teacher Heun with M = 3) spend odd NFEs only
(AFS), so their last column is NFE 9.

    OMP_NUM_THREADS=2 python benchmarks/solver_grids.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from difflab.amed.fit import AMEDConfig, fit_amed  # noqa: E402
from difflab.amed.plugin import amed_sample  # noqa: E402
from difflab.amed.predictor import predictor_sigmas  # noqa: E402
from difflab.apps.demo.run import DIGITS_STEPS  # noqa: E402
from difflab.apps.figures import image_grid  # noqa: E402
from difflab.core.errors import ConfigError  # noqa: E402
from difflab.sampling import get_sigmas, sample, seeded_noise, sigmas_for_nfe  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from solvers import digits_model  # noqa: E402

SOLVERS, NFES = ["euler", "dpmpp_2m", "unipc", "ipndm", "deis"], [3, 5, 10]
AMED_ROWS = {"amed": "dpm2", "amed_plugin_ipndm": "ipndm"}      # row -> base solver
AMED_NFE = {3: 3, 5: 5, 10: 9}                                   # AFS: odd budgets only


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    root = Path(__file__).resolve().parents[1]
    denoiser, _ = digits_model(root / "runs" / "bench" / "digits", DIGITS_STEPS)
    x_start = seeded_noise(range(16), (1, 8, 8), 80.0)
    with torch.no_grad():
        reference = sample(denoiser, x_start, get_sigmas("karras", 1001, 0.002, 80.0), "heun")
        rows = {}
        for solver in SOLVERS:
            for nfe in NFES:
                try:
                    rows[solver, nfe] = sample(denoiser, x_start, sigmas_for_nfe(solver, nfe), solver)
                except ConfigError:
                    rows[solver, nfe] = None
    for row, base in AMED_ROWS.items():
        for nfe in NFES:
            config = AMEDConfig(nfe=AMED_NFE[nfe], M=3, trajectories=2048, batch_size=32, base_solver=base)
            predictor = fit_amed(denoiser, config).model
            with torch.no_grad():
                rows[row, nfe] = amed_sample(denoiser, x_start, predictor_sigmas(predictor), predictor)
    names = SOLVERS + list(AMED_ROWS)
    fig, axes = plt.subplots(len(names), len(NFES) + 1, figsize=(2.2 * (len(NFES) + 1), 2.3 * len(names)))
    for r, solver in enumerate(names):
        for c, nfe in enumerate(NFES):
            ax = axes[r, c]
            if rows[solver, nfe] is not None:
                ax.imshow(image_grid(rows[solver, nfe], ncol=4), cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{solver}, NFE {AMED_NFE[nfe] if solver in AMED_ROWS else nfe}", fontsize=8)
            ax.axis("off")
        axes[r, -1].imshow(image_grid(reference, ncol=4), cmap="gray", vmin=0, vmax=255)
        axes[r, -1].set_title("reference (Heun 1000 steps)", fontsize=8)
        axes[r, -1].axis("off")
    fig.tight_layout()
    out = Path(__file__).parent / "results" / "solver_grids.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
