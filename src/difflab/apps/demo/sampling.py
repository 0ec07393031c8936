"""The demo's fast-sampling section: every solver at NFE 3 / 5 / 10 on the image base model against a
fine reference, AMED-Solver and AMED-Plugin (iPNDM) fitted on the spot, an error-vs-NFE plot and
sample grids."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from difflab.amed.plugin import amed_sample
from difflab.amed.predictor import predictor_sigmas
from difflab.apps.demo.datasets import image_base
from difflab.apps.figures import save_figure, save_image_grid
from difflab.core.errors import ConfigError
from difflab.metrics.distances import mean_l2
from difflab.sampling.grids import get_sigmas
from difflab.sampling.noise import seeded_noise
from difflab.sampling.sample import sample, sigmas_for_nfe

DEMO_NFES = (3, 5, 10)
DEMO_SOLVERS = ("euler", "heun", "dpm2", "dpmpp_2m", "dpmpp_3m", "ipndm", "ipndm_v", "deis", "unipc")
GRID_SOLVERS = ("euler", "dpmpp_2m", "unipc")          # shown as sample grids next to AMED
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
REF_POINTS = {True: 51, False: 101}      # the reference: Heun on this many Karras points (quick / full)
# samples scored, AMED fits (NFE), their training and held-out trajectories: quick / full
SIZES = {True: {"n": 32, "amed_nfes": (5,), "trajectories": 64, "heldout": 256},
         False: {"n": 128, "amed_nfes": (3, 5), "trajectories": 384, "heldout": 256}}


def _solver_run(denoiser, noise: torch.Tensor, solver: str, nfe: int) -> torch.Tensor | None:
    """The solver at exactly `nfe` evaluations (without AFS if it can, else with), or None if it cannot."""
    for afs in (False, True):
        try:
            sigmas = sigmas_for_nfe(solver, nfe, "karras", SIGMA_MIN, SIGMA_MAX, afs=afs)
        except ConfigError:
            continue
        return sample(denoiser, noise * float(sigmas[0]) / SIGMA_MAX, sigmas, solver, afs=afs)
    return None


def demo_section(out: Path, quick: bool, seed: int, device: str, base: dict) -> dict:
    """base: the demo's image base (datasets.image_base; base["digits"], a digits denoiser, by default).
    Writes sampling_error.png and sampling_grids.png into `out`."""
    from difflab.amed.fit import AMEDConfig, fit_amed

    data, denoiser = image_base(base)
    denoiser = denoiser.to(device)
    sizes = SIZES[bool(quick)]
    n = sizes["n"]
    noise = seeded_noise(range(seed, seed + n), data.shape, SIGMA_MAX, device=device)
    with torch.no_grad():
        reference = sample(denoiser, noise, get_sigmas("karras", REF_POINTS[quick], SIGMA_MIN, SIGMA_MAX), "heun")
        errors, finals = {}, {}
        for solver in DEMO_SOLVERS:
            for nfe in DEMO_NFES:
                x = _solver_run(denoiser, noise, solver, nfe)
                errors.setdefault(solver, {})[str(nfe)] = None if x is None else round(mean_l2(x, reference), 4)
                finals[(solver, nfe)] = x
    amed, fit_seconds = {}, {}
    for row, base_solver, M in (("amed", "dpm2", 1), ("amed_plugin_ipndm", "ipndm", 3)):
        for nfe in sizes["amed_nfes"]:
            start = time.perf_counter()
            # held-out reference: 8 Heun substeps per interval (the default 16 costs the demo's four fits 20 s more;
            # on the digits model at NFE 3-5 the held-out errors of the two agree to 1%)
            config = AMEDConfig(nfe=nfe, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, M=M, base_solver=base_solver,
                                trajectories=sizes["trajectories"], heldout=sizes["heldout"], heldout_substeps=8,
                                batch_size=32, seed=seed, device=device)
            predictor = fit_amed(denoiser, config).model
            fit_seconds[f"{row} NFE {nfe}"] = round(time.perf_counter() - start, 1)
            with torch.no_grad():
                x = amed_sample(denoiser, noise, predictor_sigmas(predictor), predictor)
            errors.setdefault(row, {})[str(nfe)] = round(mean_l2(x, reference), 4)
            finals[(row, nfe)] = x
        amed[row] = {"base_solver": base_solver, "teacher": f"heun, M={M}"}
    _plot_errors(errors, out / "sampling_error.png", data.name)
    rows = [(name, nfe) for name in (*GRID_SOLVERS, "amed_plugin_ipndm") for nfe in DEMO_NFES
            if finals.get((name, nfe)) is not None]
    save_image_grid(torch.cat([finals[key][:8].cpu() for key in rows] + [reference[:8].cpu()]),
                    out / "sampling_grids.png", ncol=8)
    at5 = {k: v["5"] for k, v in errors.items() if v.get("5") is not None and not k.startswith("amed")}
    best = min(at5, key=at5.get)
    return {"n_samples": n, "reference": f"heun on {REF_POINTS[quick]} Karras points", "errors": errors,
            "amed": amed, "amed_fit_seconds": fit_seconds, "best_training_free_nfe5": {best: at5[best]},
            "grid_rows": [f"{name} NFE {nfe}" for name, nfe in rows] + ["reference"],
            "figures": ["sampling_error.png", "sampling_grids.png"]}


def _plot_errors(errors: dict, path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, cells in errors.items():
        pts = [(int(k), v) for k, v in cells.items() if v is not None]
        style = dict(marker="*", ms=11, lw=2.2) if name.startswith("amed") else dict(marker=".", lw=1.2)
        ax.plot(*zip(*pts), label=name, **style)
    ax.set(xscale="linear", yscale="log", xlabel="NFE", ylabel="mean L2 error to the reference",
           title=f"{dataset}: error vs NFE", xticks=list(DEMO_NFES))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)
