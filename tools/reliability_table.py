"""Run the reliability tests (`pytest -m reliability`) and print their tally per category as a markdown table.

    python tools/reliability_table.py [PYTEST ARGS...]      # e.g. tests/core to run a part

Each test marked `@pytest.mark.reliability(CATEGORY)` is one case per parameter set (a hypothesis test
is one case however many examples it draws). A case holds when it passes; it fails when it fails,
errors, or is an expected failure (a strict xfail names a guarantee that does not hold yet). Skipped
cases are not tried. Exit status: 0 when every case tried held, 1 otherwise, 2 for a category outside
CATEGORIES. docs/reliability.md explains the categories and shows the table.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

CATEGORIES = ("checkpoints", "outputs", "configs", "cli input", "concurrency", "numerics")
ROOT = Path(__file__).resolve().parents[1]


class Tally:
    """A pytest plugin: the reliability category of every collected test and how each one ended."""

    def __init__(self) -> None:
        self.category: dict[str, str] = {}
        self.outcome: dict[str, str] = {}

    def pytest_collection_modifyitems(self, items) -> None:
        for item in items:
            mark = item.get_closest_marker("reliability")
            if mark is not None:
                self.category[item.nodeid] = mark.args[0] if mark.args else "(no category)"

    def pytest_runtest_logreport(self, report) -> None:
        if report.nodeid not in self.category:
            return
        if hasattr(report, "wasxfail") and report.skipped:
            self.outcome[report.nodeid] = "failed"              # a known failure: the guarantee does not hold
        elif report.failed:
            self.outcome[report.nodeid] = "failed"
        elif report.skipped:
            self.outcome.setdefault(report.nodeid, "skipped")
        elif report.when == "call":
            self.outcome.setdefault(report.nodeid, "held")

    def counts(self) -> dict[str, Counter]:
        table = {category: Counter() for category in CATEGORIES}
        for nodeid, category in self.category.items():
            table.setdefault(category, Counter())[self.outcome.get(nodeid, "not run")] += 1
        return table


def markdown(table: dict[str, Counter]) -> str:
    rows = ["| category | cases tried | held | failed |", "| --- | ---: | ---: | ---: |"]
    total = Counter()
    for category, counts in table.items():
        total += counts
        rows.append(f"| {category} | {counts['held'] + counts['failed']} | {counts['held']} | {counts['failed']} |")
    rows.append(f"| **all** | **{total['held'] + total['failed']}** | **{total['held']}** | **{total['failed']}** |")
    skipped = total["skipped"] + total["not run"]
    return "\n".join(rows) + (f"\n\n{skipped} case(s) skipped or not run." if skipped else "")


def main(argv: list[str]) -> int:
    tally = Tally()
    pytest.main(["-m", "reliability", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                 *(argv or [str(ROOT / "tests")])], plugins=[tally])
    table = tally.counts()
    print()
    print(markdown(table))
    unknown = sorted(set(table) - set(CATEGORIES))
    if unknown:
        print(f"\nunknown reliability categories: {', '.join(unknown)}; use one of {', '.join(CATEGORIES)}",
              file=sys.stderr)
        return 2
    return 1 if any(counts["failed"] for counts in table.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
