"""The 2-D SuperDiff picture (the paper's Figure 2 on exact mixtures) and its numbers, for `difflab demo`
and benchmarks/compose.py: two Gaussian mixtures, each model's samples, averaging, OR and AND."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from difflab.compose.superdiff import superdiff
from difflab.core.mixture import GaussianMixture
from difflab.sampling import PerSampleGenerator, get_sigmas, seeded_noise

FIGURE = "compose_2d.png"


def demo_mixtures() -> tuple[GaussianMixture, GaussianMixture]:
    """Two overlapping 2-D mixtures: their union (OR) and their equal-density set (AND) differ visibly."""
    a = GaussianMixture([[-2.0, 0.0], [0.0, 2.5]], stds=[1.0, 0.7], weights=[0.6, 0.4])
    b = GaussianMixture([[2.5, 1.0], [0.5, 2.0]], stds=[1.2, 0.8], weights=[0.5, 0.5])
    return a, b


def union(a: GaussianMixture, b: GaussianMixture) -> GaussianMixture:
    """The exact equal-weight mixture ½a + ½b (what OR at T = 1 samples)."""
    return GaussianMixture(torch.cat([a.means, b.means]), covs=torch.cat([a.covs, b.covs]),
                           weights=torch.cat([a.weights, b.weights]) / 2)


def compose_2d(n: int, steps: int, seed: int, device: str = "cpu", sde: bool = True) -> dict:
    """Samples of each model alone, averaging, OR (T = 1) and AND from the same seeds, with the final
    log q estimates. Returns {name: CompositionResult} and the grid under "sigmas"."""
    a, b = demo_mixtures()
    a, b = a.to(device), b.to(device)
    sigmas = get_sigmas("karras", steps + 1, 0.01, 80.0)
    x = seeded_noise(range(seed, seed + n), (2,), 80.0, dtype=torch.float64, device=device)
    runs = {"model A": ("average", [0.0, -float("inf")]), "model B": ("average", [-float("inf"), 0.0]),
            "average": ("average", None), "OR": ("or", None), "AND": ("and", None)}
    results = {}
    for name, (mode, bias) in runs.items():
        generator = PerSampleGenerator([s + 2**40 for s in range(seed, seed + n)])
        results[name] = superdiff([a, b], x, sigmas, mode=mode, bias=bias, sde=sde, generator=generator)
    return {"results": results, "sigmas": sigmas, "start": x, "models": (a, b)}


def summarise(run: dict) -> dict:
    """The numbers: exact NLL under ½A + ½B, sliced W2 to exact ½A + ½B samples, the AND gap
    |log q_A − log q_B| (exact, at σ_min), and the Itô estimator's error against exact log_prob."""
    from difflab.metrics import exact_nll, sliced_wasserstein

    a, b = run["models"]
    sigmas, start = run["sigmas"], run["start"]
    both = union(a.cpu(), b.cpu())
    reference = both.sample(len(start), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = {}
    for name, result in run["results"].items():
        x = result.x.cpu()
        exact = torch.stack([m.cpu().log_prob(x, sigmas[-1]) - m.cpu().log_prob(start.cpu(), sigmas[0])
                             for m in (a, b)], 1)
        gap = (a.cpu().log_prob(x, sigmas[-1]) - b.cpu().log_prob(x, sigmas[-1])).abs()
        rows[name] = {"nll_union": round(exact_nll(both, x.float()), 4),
                      "sliced_w2_to_union": round(sliced_wasserstein(x.float(), reference.float()), 4),
                      "and_gap_median": round(float(gap.median()), 4),
                      "log_q_error_mean": round(float((result.log_q.cpu() - exact).abs().mean()), 4)}
    rows["exact union samples"] = {"nll_union": round(exact_nll(both, reference.float()), 4),
                                   "sliced_w2_to_union": round(sliced_wasserstein(
                                       both.sample(len(start), generator=torch.Generator().manual_seed(2)),
                                       reference.float()), 4)}
    return rows


def save_figure(run: dict, path: Path) -> Path:
    """Five panels (A, B, averaging, OR, AND) over the two models' density contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difflab.apps.figures import save_figure

    a, b = (m.cpu() for m in run["models"])
    grid = torch.linspace(-6, 6, 121, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    points = torch.stack([xx.flatten(), yy.flatten()], 1)
    sigma_end = float(run["sigmas"][-1])
    density = {name: m.log_prob(points, sigma_end).exp().reshape(xx.shape) for name, m in (("A", a), ("B", b))}
    results = run["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(3.0 * len(results), 3.2), sharex=True, sharey=True)
    for ax, (name, result) in zip(axes, results.items()):
        ax.contour(xx, yy, density["A"], levels=4, colors="tab:blue", linewidths=0.7)
        ax.contour(xx, yy, density["B"], levels=4, colors="tab:orange", linewidths=0.7)
        samples = result.x.cpu()
        ax.scatter(samples[:, 0], samples[:, 1], s=1.5, alpha=0.4, color="black")
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.set_xlim(-6, 6)
        ax.set_ylim(-6, 6)
    fig.suptitle("SuperDiff on two exact mixtures (blue: A, orange: B)")
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def demo_section(out: Path, quick: bool, seed: int, device: str, base: dict) -> dict:
    """`difflab demo`'s composition section: the 2-D OR/AND figure in OUT and its numbers.

    quick: 800 samples, 40 SDE steps (a few seconds on one core); else 4,000 samples, 200 steps.
    `base` (the demo's trained models) is not used: the 2-D part needs only the exact mixtures.
    """
    start = time.perf_counter()
    n, steps = (800, 40) if quick else (4000, 200)
    with torch.no_grad():
        run = compose_2d(n, steps, seed, device)
    rows = summarise(run)
    save_figure(run, Path(out) / FIGURE)
    return {"n": n, "steps": steps, "solver": "SuperDiff SDE (Euler–Maruyama + Itô density estimator)",
            "mixtures": rows, "seconds": round(time.perf_counter() - start, 2), "figures": [FIGURE]}
