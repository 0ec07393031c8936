"""`difflab demo`: the main job, end to end on the embedded defaults, into one HTML report.

Base models first: a denoiser trained on a 2-D Gaussian mixture (checked against the exact mixture)
and one on an image data set (`data`: scikit-learn's embedded digits by default, or MNIST 28×28; see
datasets.py), checked with a Fréchet distance against the real-data floor; trained models are cached
in OUT/models and reused. Then one section per capability (SECTIONS: fast sampling and AMED,
SuperDiff, DEFT / DPS / ΠGDM, guided distillation, cU-Net), each a
`demo_section(out, quick, seed, device, base)` in its own package returning JSON-able numbers and
the PNGs it wrote; base["data"] names the image data set they run on.
Output: OUT/report.json (every number) and OUT/report.html (self-contained).
"""
from __future__ import annotations

import base64
import html
import time
from pathlib import Path

import torch
from rich.console import Console

from difflab.apps.demo.datasets import DIGITS_BATCH, DIGITS_STEPS, DIGITS_UNET, ImageData, image_data
from difflab.core.errors import ConfigError
from difflab.core.io import atomic_path, write_json
from difflab.core.mixture import GaussianMixture
from difflab.models import load
from difflab.sampling import get_sigmas, sample, seeded_noise
from difflab.train.denoiser import DenoiserConfig

console = Console(stderr=True)
# DIGITS_*: the digits recipe, imported from here by the benchmarks
__all__ = ["DIGITS_BATCH", "DIGITS_STEPS", "DIGITS_UNET", "SECTIONS", "cached_model", "heun_sigmas", "image_section",
           "render_html", "run_demo"]


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


def image_section(out: Path, quick: bool, seed: int, device: str, data: ImageData,
                  model_dir: Path | None = None) -> tuple[dict, object, Path]:
    """Train a small U-Net on `data` (or load the one in `model_dir`); Fréchet distance of its samples vs
    the real-data floor. Returns (numbers, the denoiser, its folder)."""
    from difflab.apps.figures import save_image_grid
    from difflab.metrics import frechet, frechet_floor
    from difflab.nets import UNet
    from difflab.train.denoiser import train_denoiser

    train_set = data.load("train")
    given = model_dir is not None
    if not given:
        steps = data.steps(quick)

        def train():
            config = DenoiserConfig(train_steps=steps, lr=2e-3, seed=seed, device=device, checkpoint_every=steps,
                                    batch_size=data.batch_size, dataset=data.name)
            return train_denoiser(UNet(**data.unet), train_set.x, config=config).model

        model_dir = out / "models" / f"{data.name}-{steps}"
        denoiser, train_seconds = cached_model(model_dir, train)
    else:
        denoiser, train_seconds = given_model(model_dir, data), 0.0
        steps = denoiser.meta.get("fit", {}).get("train_steps")
    n = data.samples(quick)
    sigmas = heun_sigmas(18, 0.002, 80.0)
    noise = seeded_noise(range(seed, seed + n), data.shape, float(sigmas[0]), device=device)
    with torch.no_grad():
        samples = sample(denoiser.to(device), noise, sigmas, "heun").cpu()
    save_image_grid(samples[:100], out / f"{data.name}.png", ncol=10)
    # held-out images: MNIST's test split comes class-interleaved (its train split is stored by class)
    save_image_grid(data.load("test").x[:100], out / f"{data.name}_real.png", ncol=10)
    numbers = {"train_steps": steps, "train_seconds": round(train_seconds, 1),
               "parameters": sum(p.numel() for p in denoiser.parameters()), "n_samples": n,
               "frechet": frechet(data.name, samples), "frechet_floor": frechet_floor(data.name, n),
               "figures": [f"{data.name}.png", f"{data.name}_real.png"]}
    if given:
        numbers["model"] = str(model_dir)
    return numbers, denoiser, Path(model_dir)


def given_model(folder: Path, data: ImageData):
    """The denoiser in `folder`, checked to be a model of `data`'s images; ConfigError otherwise."""
    denoiser = load(folder)
    shape = getattr(denoiser, "data_shape", None)
    if shape is not None and tuple(shape) != data.shape:
        raise ConfigError(f"the model in {str(folder)!r} makes images of shape {list(shape)}, but data set "
                          f"{data.name!r} has {list(data.shape)}; pass a model trained on {data.name}")
    return denoiser


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
             only: tuple[str, ...] | None = None, data: str = "digits", model: Path | None = None) -> dict:
    """Run every section, write OUT/report.json and OUT/report.html; returns the summary.

    The base models (2-D mixture MLP, a U-Net on the image data set `data`: "digits" or "mnist") are
    trained first (or loaded from OUT/models; `model`: an already trained model folder of `data` used
    as the image base instead); `only` restricts the capability sections to those keys (the base
    sections always run). Every image section runs on `data`.
    """
    import importlib

    images = image_data(data)
    if model is not None:
        given_model(model, images)   # a wrong folder fails now, not after the first section
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sections: dict[str, dict] = {}
    base: dict = {"data": images}
    plan = [("gmm", "Base model: 2-D Gaussian mixture", "", None),
            (images.name, f"Base model: {images.title}", "", None),
            *[spec for spec in SECTIONS if only is None or spec[0] in only]]
    for number, (key, title, _, target) in enumerate(plan, 1):
        console.rule(f"[bold]{number}/{len(plan)} {title}")
        start = time.perf_counter()
        if key == "gmm":
            sections[key] = gmm_section(out, quick, seed, device)
        elif key == images.name:
            sections[key], base[key], base[f"{key}_dir"] = image_section(out, quick, seed, device, images, model)
        else:
            module, function = target.split(":")
            sections[key] = getattr(importlib.import_module(module), function)(out, quick, seed, device, base)
        sections[key]["seconds"] = round(time.perf_counter() - start, 1)
        console.print(f"{title}: {sections[key]['seconds']} s")
    report = {"dataset": images.name, "quick": quick, "seed": seed, "device": device, "sections": sections,
              "titles": {key: (title, text) for key, title, text, _ in plan}}
    write_json(out / "report.json", report, default=_jsonable)
    _write_text(out / "report.html", render_html(report, out))
    return {"report": str(out / "report.html"), "dataset": images.name,
            **{k: _headline(v) for k, v in sections.items()}}


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
    dataset = html.escape(report.get("dataset", "digits"))
    run_note = f"data set {dataset}, seed {report['seed']}, device {html.escape(report['device'])}{quick_note}"
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
