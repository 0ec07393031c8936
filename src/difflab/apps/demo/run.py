"""`difflab demo`: the main job, end to end on the embedded defaults, into one HTML report.

Base models first: a denoiser trained on a 2-D Gaussian mixture (checked against the exact mixture)
and on scikit-learn's digits (checked with a Fréchet distance against the real-data floor); trained
models are cached in OUT/models and reused. Then one section per capability (SECTIONS: fast
sampling and AMED, SuperDiff, DEFT / DPS / ΠGDM, guided distillation, cU-Net), each a
`demo_section(out, quick, seed, device, base)` in its own package returning JSON-able numbers and
the PNGs it wrote. Output: OUT/report.json (every number) and OUT/report.html (self-contained).
"""
from __future__ import annotations

import base64
import html
import time
from pathlib import Path

import torch
from rich.console import Console

from difflab.core.io import atomic_path, write_json
from difflab.core.mixture import GaussianMixture
from difflab.models import load
from difflab.sampling import get_sigmas, sample, seeded_noise
from difflab.train.denoiser import DenoiserConfig

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
    from difflab.apps.figures import save_scatter
    from difflab.data import default_gmm
    from difflab.metrics import exact_nll, sliced_wasserstein
    from difflab.nets import MLP
    from difflab.train.denoiser import train_denoiser

    truth: GaussianMixture = default_gmm()
    data = truth.sample(20_000, generator=torch.Generator().manual_seed(seed))
    steps = 600 if quick else 1000

    def train():
        config = DenoiserConfig(train_steps=steps, lr=2e-3, seed=seed, device=device, checkpoint_every=steps,
                                batch_size=512, dataset="gmm")
        return train_denoiser(MLP(dim=2), data, config=config).model

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
            "figures": ["gmm.png"]}


def digits_section(out: Path, quick: bool, seed: int, device: str) -> dict:
    """Train a small U-Net on the digits; Fréchet distance of its samples vs the real-data floor."""
    from difflab.apps.figures import save_image_grid
    from difflab.data import load_digits
    from difflab.metrics import digits_frechet, digits_frechet_floor
    from difflab.nets import UNet
    from difflab.train.denoiser import train_denoiser

    train_set = load_digits("train")
    steps = 200 if quick else DIGITS_STEPS

    def train():
        config = DenoiserConfig(train_steps=steps, lr=2e-3, seed=seed, device=device, checkpoint_every=steps,
                                batch_size=DIGITS_BATCH, dataset="digits")
        return train_denoiser(UNet(**DIGITS_UNET), train_set.x, config=config).model

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
            "figures": ["digits.png", "digits_real.png"]}, denoiser


DIGITS_UNET = {"base_channels": 32, "channel_mults": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [4]}
DIGITS_STEPS, DIGITS_BATCH = 500, 128  # the default recipe (benchmarks/train_digits.py measures it)


# ----- the sections ------------------------------------------------------------------------------
# (key, title, what it shows, "module:function"); each function is demo_section(out, quick, seed, device, base)
SECTIONS: tuple[tuple[str, str, str, str], ...] = (
    ("sampling", "Fast sampling: every solver at NFE 3 / 5 / 10, AMED fitted on the spot",
     "Mean L2 distance at σ_min to a fine Heun solution from the same noise, on the digits model; AMED-Solver "
     "and AMED-Plugin (iPNDM) predictors are fitted here (docs/methods/amed.md). Grid rows: solver × NFE, then the "
     "reference.", "difflab.apps.demo.sampling:demo_section"),
    ("compose", "SuperDiff: OR and AND of two models",
     "Two Gaussian mixtures composed by SuperDiff with the Itô density estimator (docs/methods/superdiff.md).",
     "difflab.apps.demo.compose:demo_section"),
    ("condition", "Inverse problems: DEFT vs DPS vs ΠGDM",
     "Digit reconstruction from partial measurements with a small learned h-transform (DEFT) fitted here, "
     "against the gradient-guided baselines at equal steps (docs/methods/deft.md).",
     "difflab.apps.demo.condition:demo_section"),
    ("distill", "Guided distillation: a 4-step student next to the guided teacher",
     "A class-conditional digits teacher with classifier-free guidance, distilled into a w-conditioned "
     "few-step student (docs/methods/distillation.md).", "difflab.apps.demo.distill:demo_section"),
    ("cunet", "cU-Net vs U-Net",
     "The U-Net whose stages are ODE blocks, against the baseline U-Net (docs/methods/cunet.md).",
     "difflab.apps.demo.cunet:demo_section"),
)


def run_demo(out: Path, quick: bool = False, seed: int = 0, device: str = "cpu",
             only: tuple[str, ...] | None = None) -> dict:
    """Run every section, write OUT/report.json and OUT/report.html; returns the summary.

    The base models (2-D mixture MLP, digits U-Net) are trained first (or loaded from OUT/models);
    `only` restricts the capability sections to those keys (the base sections always run).
    """
    import importlib

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections: dict[str, dict] = {}
    base: dict = {}
    plan = [("gmm", "Base model: 2-D Gaussian mixture", "", None), ("digits", "Base model: digits", "", None),
            *[spec for spec in SECTIONS if only is None or spec[0] in only]]
    for number, (key, title, _, target) in enumerate(plan, 1):
        console.rule(f"[bold]{number}/{len(plan)} {title}")
        start = time.perf_counter()
        if key == "gmm":
            sections[key] = gmm_section(out, quick, seed, device)
        elif key == "digits":
            sections[key], base["digits"] = digits_section(out, quick, seed, device)
            base["digits_dir"] = out / "models" / f"digits-{sections[key]['train_steps']}"
        else:
            module, function = target.split(":")
            sections[key] = getattr(importlib.import_module(module), function)(out, quick, seed, device, base)
        sections[key]["seconds"] = round(time.perf_counter() - start, 1)
        console.print(f"{title}: {sections[key]['seconds']} s")
    report = {"quick": quick, "seed": seed, "device": device, "sections": sections,
              "titles": {key: (title, text) for key, title, text, _ in plan}}
    write_json(out / "report.json", report, default=_jsonable)
    _write_text(out / "report.html", render_html(report, out))
    return {"report": str(out / "report.html"), **{k: _headline(v) for k, v in sections.items()}}


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _headline(section: dict) -> dict:
    """The scalars of a section (what `difflab demo` prints)."""
    return {k: v for k, v in section.items() if isinstance(v, (int, float, str)) and "figure" not in k}


# ----- the page ------------------------------------------------------------------------------------
def _img(out: Path, name: str) -> str:
    data = base64.b64encode((out / name).read_bytes()).decode()
    caption = html.escape(name)
    return (f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (int, float, str, bool))


def _tables(section: dict) -> str:
    """Scalars as one key/value table; a dict of scalars as its own table; a dict of dicts of scalars
    as a matrix (rows × columns); lists of scalars inline; figures are rendered elsewhere."""
    scalars, blocks = [], []
    for key, value in section.items():
        if "figure" in key:
            continue
        if _is_scalar(value):
            scalars.append((key, value))
        elif isinstance(value, list) and all(_is_scalar(v) for v in value):
            scalars.append((key, ", ".join(_fmt(v) for v in value)))
        elif isinstance(value, dict) and value and all(_is_scalar(v) for v in value.values()):
            rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>" for k, v in value.items())
            blocks.append(f"<h3>{html.escape(key)}</h3><table>{rows}</table>")
        elif isinstance(value, dict) and value and all(isinstance(v, dict) and all(_is_scalar(c) for c in v.values())
                                                       for v in value.values()):
            columns = list(dict.fromkeys(c for v in value.values() for c in v))
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
            rows = "".join(f"<tr><td>{html.escape(str(k))}</td>"
                           + "".join(f"<td>{_fmt(v.get(c))}</td>" for c in columns)
                           + "</tr>" for k, v in value.items())
            blocks.append(f"<h3>{html.escape(key)}</h3>"
                          f"<div class=scroll><table><tr><th></th>{head}</tr>{rows}</table></div>")
    table = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>" for k, v in scalars)
    return (f"<table>{table}</table>" if table else "") + "".join(blocks)


def _figures(section: dict, out: Path) -> list[str]:
    names = list(section.get("figures", []))
    names += [v for k, v in section.items() if k.endswith("figure") and isinstance(v, str)]
    return [name for name in names if (out / name).is_file()]


def render_html(report: dict, out: Path) -> str:
    """A self-contained page (images inlined) that reads on a phone and a laptop."""
    body = []
    for key, section in report["sections"].items():
        title, text = report["titles"][key]
        figures = "".join(_img(out, name) for name in _figures(section, out))
        body.append(f"<section id={key}><h2>{html.escape(title)}</h2><p>{html.escape(text)}</p>"
                    f"<div class=figs>{figures}</div>{_tables(section)}</section>")
    toc = "".join(f'<li><a href="#{k}">{html.escape(report["titles"][k][0])}</a></li>' for k in report["sections"])
    quick_note = ", quick run" if report["quick"] else ""
    run_note = f"seed {report['seed']}, device {html.escape(report['device'])}{quick_note}"
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>difflab demo</title>
<style>body{{font-family:system-ui,sans-serif;max-width:62rem;margin:auto;padding:1rem;line-height:1.45}}
img{{max-width:100%;height:auto;image-rendering:pixelated}}table{{border-collapse:collapse;margin:.4rem 0}}
td,th{{border-bottom:1px solid #ddd;padding:.25rem .5rem;font-size:.92rem}}
td:not(:first-child){{text-align:right;font-variant-numeric:tabular-nums}}.scroll{{overflow-x:auto}}
.figs{{display:flex;flex-wrap:wrap;gap:1rem}}figure{{margin:0;flex:1 1 18rem}}figcaption{{color:#666;font-size:.8rem}}
section{{border-top:2px solid #eee;margin-top:1.5rem}}</style></head><body>
<h1>difflab demo</h1><p>{run_note}.
Every model here was trained or fitted on this machine; the 2-D results are checked against the exact mixture.</p>
<ol>{toc}</ol>{''.join(body)}</body></html>"""
