"""`difflab demo`: the main job, end to end on the embedded defaults, into one HTML report.

Today it shows the foundation: a base denoiser trained on a 2-D Gaussian mixture (checked against
the exact mixture) and on scikit-learn's digits (checked with a Fréchet distance against the
real-data floor), sampled with Heun. Trained models are cached in OUT/models and reused.
"""
from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

import torch
from rich.console import Console

from .core.mixture import GaussianMixture
from .models import load
from .sampling import get_sigmas, sample, seeded_noise
from .train import TrainConfig

console = Console(stderr=True)


def heun_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """EDM's default grid: `steps` Karras points then σ = 0 (NFE = 2·steps − 1)."""
    return torch.cat([get_sigmas("karras", steps, sigma_min, sigma_max), torch.zeros(1, dtype=torch.float64)])


def cached_model(folder: Path, train_fn):
    """Load the model in `folder`, or train it with `train_fn() -> denoiser` and save it there."""
    if (folder / "config.json").is_file():
        return load(folder), 0.0
    start = time.perf_counter()
    denoiser = train_fn()
    seconds = time.perf_counter() - start
    denoiser.save(folder, overwrite=True)
    return load(folder), seconds


def gmm_section(out: Path, quick: bool, seed: int, device: str) -> dict:
    """Train an MLP denoiser on samples of the exact 8-Gaussian mixture; compare with the truth."""
    from .data import default_gmm
    from .metrics import exact_nll, sliced_wasserstein
    from .nets import MLP
    from .report import save_scatter
    from .train.denoiser import train_denoiser

    truth: GaussianMixture = default_gmm()
    data = truth.sample(20_000, generator=torch.Generator().manual_seed(seed))
    steps = 600 if quick else 2000

    def train():
        config = TrainConfig(steps=steps, lr=2e-3, seed=seed, device=device, checkpoint_every=steps)
        return train_denoiser(MLP(dim=2), data, config=config, batch_size=512, dataset="gmm")[0]

    denoiser, train_seconds = cached_model(out / "models" / f"gmm-{steps}", train)
    n = 2000
    sigmas = heun_sigmas(18, 0.002, 80.0)
    noise = seeded_noise(range(seed, seed + n), (2,), float(sigmas[0]))
    with torch.no_grad():
        learned = sample(denoiser.to(device), noise.to(device), sigmas, "heun").cpu()
        exact_ode = sample(truth, noise.double(), sigmas, "heun").float()
    reference = truth.sample(n, generator=torch.Generator().manual_seed(seed + 1))
    save_scatter({"exact samples": reference, "exact denoiser, Heun 35": exact_ode,
                  "learned MLP, Heun 35": learned}, out / "gmm.png", "8-Gaussian mixture")
    return {"train_steps": steps, "train_seconds": round(train_seconds, 1),
            "sliced_wasserstein": {"learned": sliced_wasserstein(learned, reference),
                                   "exact_denoiser": sliced_wasserstein(exact_ode, reference),
                                   "fresh_exact_samples": sliced_wasserstein(truth.sample(
                                       n, generator=torch.Generator().manual_seed(seed + 2)), reference)},
            "nll": {"learned": exact_nll(truth, learned), "exact_samples": exact_nll(truth, reference)},
            "figure": "gmm.png"}


def digits_section(out: Path, quick: bool, seed: int, device: str) -> dict:
    """Train a small U-Net on the digits; Fréchet distance of its samples vs the real-data floor."""
    from .data import load_digits
    from .metrics import digits_frechet, digits_frechet_floor
    from .nets import UNet
    from .report import save_image_grid
    from .train.denoiser import train_denoiser

    train_set = load_digits("train")
    steps = 200 if quick else DIGITS_STEPS

    def train():
        config = TrainConfig(steps=steps, lr=2e-3, seed=seed, device=device, checkpoint_every=steps)
        return train_denoiser(UNet(**DIGITS_UNET), train_set.x, config=config, batch_size=DIGITS_BATCH,
                              dataset="digits")[0]

    denoiser, train_seconds = cached_model(out / "models" / f"digits-{steps}", train)
    n = 297 if quick else 1000
    sigmas = heun_sigmas(18, 0.002, 80.0)
    noise = seeded_noise(range(seed, seed + n), (1, 8, 8), float(sigmas[0]), device=device)
    with torch.no_grad():
        samples = sample(denoiser.to(device), noise, sigmas, "heun").cpu()
    save_image_grid(samples[:100], out / "digits.png", ncol=10)
    save_image_grid(train_set.x[:100], out / "digits_real.png", ncol=10)
    return {"train_steps": steps, "train_seconds": round(train_seconds, 1),
            "parameters": sum(p.numel() for p in denoiser.parameters()), "n_samples": n,
            "frechet": digits_frechet(samples), "frechet_floor": digits_frechet_floor(n),
            "figure": "digits.png", "real_figure": "digits_real.png"}


DIGITS_UNET = {"base_channels": 32, "channel_mults": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [4]}
DIGITS_STEPS, DIGITS_BATCH = 500, 128  # the default recipe (benchmarks/train_digits.py measures it)


def run_demo(out: Path, quick: bool = False, seed: int = 0, device: str = "cpu") -> dict:
    """Run every section, write OUT/report.json and OUT/report.html; returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections = {}
    for name, section in (("gmm", gmm_section), ("digits", digits_section)):
        console.rule(f"[bold]{name}")
        start = time.perf_counter()
        sections[name] = section(out, quick, seed, device)
        sections[name]["seconds"] = round(time.perf_counter() - start, 1)
    report = {"quick": quick, "seed": seed, "device": device, "sections": sections}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.html").write_text(render_html(report, out))
    return {"report": str(out / "report.html"), **{k: _headline(v) for k, v in sections.items()}}


def _headline(section: dict) -> dict:
    return {k: v for k, v in section.items() if not k.endswith("figure")}


def _img(out: Path, name: str) -> str:
    data = base64.b64encode((out / name).read_bytes()).decode()
    return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'


def render_html(report: dict, out: Path) -> str:
    """A self-contained page (images inlined) that reads on a phone and a laptop."""
    gmm, digits = report["sections"]["gmm"], report["sections"]["digits"]
    sw = gmm["sliced_wasserstein"]
    rows = [("2-D mixture: sliced W₂, learned vs exact samples", f"{sw['learned']:.4f}"),
            ("2-D mixture: sliced W₂, exact denoiser + Heun", f"{sw['exact_denoiser']:.4f}"),
            ("2-D mixture: sliced W₂, fresh exact samples (floor)", f"{sw['fresh_exact_samples']:.4f}"),
            ("2-D mixture: exact NLL of learned samples", f"{gmm['nll']['learned']:.3f}"),
            ("2-D mixture: exact NLL of exact samples", f"{gmm['nll']['exact_samples']:.3f}"),
            (f"digits: Fréchet distance, {digits['n_samples']} samples", f"{digits['frechet']:.2f}"),
            ("digits: real-data floor at the same n", f"{digits['frechet_floor']:.2f}"),
            ("digits: U-Net parameters", f"{digits['parameters']:,}")]
    table = "".join(f"<tr><td>{html.escape(a)}</td><td>{b}</td></tr>" for a, b in rows)
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>difflab demo</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60rem;margin:auto;padding:1rem;line-height:1.45}}
img{{max-width:100%;height:auto;image-rendering:pixelated}}table{{border-collapse:collapse}}
td{{border-bottom:1px solid #ddd;padding:.3rem .6rem}}td:last-child{{text-align:right;font-variant-numeric:tabular-nums}}
.pair{{display:flex;flex-wrap:wrap;gap:1rem}}.pair figure{{margin:0;flex:1 1 16rem}}</style></head><body>
<h1>difflab demo</h1><p>seed {report['seed']}, device {report['device']}{', quick run' if report['quick'] else ''}.
Every model here was trained on this machine; the 2-D model is checked against the exact mixture.</p>
<h2>Metrics</h2><table>{table}</table>
<h2>2-D Gaussian mixture</h2>{_img(out, gmm['figure'])}
<h2>Digits (Heun, 35 NFE)</h2><div class="pair"><figure>{_img(out, digits['figure'])}<figcaption>samples</figcaption></figure>
<figure>{_img(out, digits['real_figure'])}<figcaption>training images</figcaption></figure></div>
</body></html>"""
