"""`difflab demo --quick`: the main job runs end to end and writes a self-contained report."""
from __future__ import annotations

import json

from difflab.demo import run_demo


def test_quick_demo_writes_report_with_every_section_and_sane_numbers(tmp_path):
    summary = run_demo(tmp_path, quick=True, seed=0, device="cpu")
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["sections"]) == {"gmm", "digits"}
    gmm, digits = report["sections"]["gmm"], report["sections"]["digits"]
    # even a short run must land on the mixture: samples from the prior N(0, 80²) would score SW ≈ 40
    assert gmm["sliced_wasserstein"]["learned"] < 0.5
    assert gmm["sliced_wasserstein"]["exact_denoiser"] < 0.2     # the exact denoiser + Heun 35 NFE
    assert digits["frechet"] > digits["frechet_floor"] > 0
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<table>" in html   # images inlined, no links
    assert summary["report"].endswith("report.html")
    # a second run reuses the cached models instead of training again
    again = run_demo(tmp_path, quick=True, seed=0, device="cpu")
    assert again["gmm"]["train_seconds"] == 0.0 and again["digits"]["train_seconds"] == 0.0
