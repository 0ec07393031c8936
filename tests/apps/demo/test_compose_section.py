"""The composition section of `difflab demo`: the 2-D OR/AND figure and its numbers."""
from __future__ import annotations

import json

import pytest

from difflab.apps.demo.compose import demo_section


@pytest.mark.slow   # ~7 s on an idle core (five 800-sample runs, POT, matplotlib); the demo's own test runs it too
def test_demo_section_writes_the_figure_and_numbers_that_tell_or_from_and(tmp_path):
    summary = demo_section(tmp_path, quick=True, seed=0, device="cpu", base={})
    json.dumps(summary)                                           # JSON-serialisable for the report
    assert (tmp_path / summary["figures"][0]).read_bytes()[:4] == b"\x89PNG"
    rows = summary["mixtures"]
    # OR samples the union ½A + ½B: closest to it of all runs (measured sliced W2: OR 0.17, averaging
    # 0.59, A or B alone ≥ 1.0; exact union samples 0.12); AND ends on log q_A = log q_B (median gap
    # measured 0.19 nats vs ≥ 1.0 for every other run)
    others = [rows[k]["sliced_w2_to_union"] for k in ("model A", "model B", "average", "AND")]
    assert rows["OR"]["sliced_w2_to_union"] < 0.5 * min(others)
    assert rows["AND"]["and_gap_median"] < 0.5
    assert min(rows[k]["and_gap_median"] for k in ("model A", "model B", "average", "OR")) > 0.8
