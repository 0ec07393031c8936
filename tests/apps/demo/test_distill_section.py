"""The distillation section of `difflab demo --quick` (slow: it trains a teacher and distils it)."""
from __future__ import annotations

import pytest

from difflab.apps.demo.distill import demo_section


@pytest.mark.slow
def test_quick_demo_section_writes_its_figure_and_numbers_and_reuses_its_models(tmp_path):
    result = demo_section(tmp_path, quick=True, seed=0, device="cpu", base={})
    assert (tmp_path / "distill.png").is_file() and result["figures"] == ["distill.png"]
    student = result["metrics"]["student 4 steps (4 NFE)"]
    assert student["accuracy"] > 0.5            # guided at w = 2; chance is 0.1 (measured 1.0)
    assert student["frechet"] > 0
    again = demo_section(tmp_path, quick=True, seed=0, device="cpu", base={})
    assert again["seconds"] == {"teacher_train": 0.0, "distillation": 0.0}
