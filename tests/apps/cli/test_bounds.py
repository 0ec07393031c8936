"""Sizes that would allocate without bound are refused by the command line before any work."""
from __future__ import annotations

import pytest

from tests.apps.cli.helpers import run

pytestmark = pytest.mark.reliability("cli input")


def test_a_huge_simulate_count_is_a_one_line_error(tmp_path, capsys):
    code, out, err = run(["condition", "run", "--model", tmp_path / "m", "--simulate", 10**9,
                          "--out", tmp_path / "r.npz"], capsys)
    assert code == 2
    assert "--simulate" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.npz").exists()
