"""`difflab demo --quick`: the main job runs every section end to end and writes a self-contained report."""
from __future__ import annotations

import json
import math
import shutil
from html.parser import HTMLParser

from difflab.apps.demo.run import SECTIONS, run_demo


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs).get("src", ""))


def _finite_leaves(value) -> list[float]:
    if isinstance(value, dict):
        return [v for item in value.values() for v in _finite_leaves(item)]
    if isinstance(value, list):
        return [v for item in value for v in _finite_leaves(item)]
    return [value] if isinstance(value, float) else []


def test_quick_demo_writes_every_section_with_sane_numbers(quick_demo_dir):
    report = json.loads((quick_demo_dir / "report.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["gmm", "digits", *[key for key, *_ in SECTIONS]]
    for key, section in sections.items():
        assert section.get("figures") or key == "cunet", key          # cunet: a table only
        for name in section.get("figures", []):
            assert (quick_demo_dir / name).stat().st_size > 1000, (key, name)
        assert all(math.isfinite(v) for v in _finite_leaves(section) if v is not None), key
    # even a short run must land on the mixture: samples from the prior N(0, 80²) would score SW ≈ 40
    gmm, digits = sections["gmm"], sections["digits"]
    assert gmm["sliced_wasserstein"]["learned"] < 0.5
    assert gmm["sliced_wasserstein"]["exact_denoiser"] < 0.2     # the exact denoiser + Heun 35 NFE
    assert digits["frechet"] > digits["frechet_floor"] > 0
    # fast sampling: more evaluations help every training-free solver that can spend 3 and 10
    errors = sections["sampling"]["errors"]
    for solver in ("euler", "dpmpp_2m", "ipndm"):
        assert errors[solver]["10"] < errors[solver]["3"], solver
    # the report is self-contained: every image inlined, one per figure
    html = (quick_demo_dir / "report.html").read_text()
    images = _Images()
    images.feed(html)
    n_figures = sum(len(s.get("figures", [])) for s in sections.values())
    assert len(images.sources) == n_figures and all(src.startswith("data:image/png;base64,") for src in images.sources)
    for title, _ in report["titles"].values():
        assert f"<h2>{title.replace('&', '&amp;')}</h2>" in html


def test_a_second_run_reuses_the_cached_base_models(quick_demo_dir, tmp_path):
    shutil.copytree(quick_demo_dir / "models", tmp_path / "models")    # (the shared report stays as it is)
    again = run_demo(tmp_path, quick=True, seed=0, device="cpu", only=())
    assert again["gmm"]["train_seconds"] == 0.0 and again["digits"]["train_seconds"] == 0.0
