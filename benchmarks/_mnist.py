"""Shared by the MNIST benchmarks: the bench models that benchmarks/mnist_models.py trains (`make bench-models`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from difflab.models import load

BENCH_MODELS = ("full", "0-4", "5-9")   # class-conditional (label dropout 0.1); unconditional on half the classes


def load_bench_models(runs: Path, names=BENCH_MODELS, device: str = "cpu") -> dict:
    """{name: denoiser} of the finished bench models in runs/<name>/model; when one is missing, one line
    that says how to make them, and exit status 2."""
    missing = missing_bench_models(runs, names)
    if missing:
        print(f"MNIST bench models missing in {runs} ({', '.join(missing)}): run `make bench-models` "
              "(or `python benchmarks/mnist_models.py --quick` and pass --runs runs/bench/mnist-quick)")
        sys.exit(2)
    return {name: load(Path(runs) / name / "model").to(device).eval() for name in names}


def run_record(folder: Path) -> dict:
    """A bench model's run record, folder/run.json (its plan and cost; mnist_models.py writes it); {} when missing."""
    record_path = Path(folder) / "run.json"
    return json.loads(record_path.read_text()) if record_path.is_file() else {}


def bench_train_seconds(runs: Path, name: str) -> float | None:
    """Seconds that bench model `name` took to train, from its run record; None when that record is missing or
    the run was resumed (its seconds then cover only the steps after the resume)."""
    record = run_record(Path(runs) / name)
    if "train_seconds" not in record or record.get("resumed_from_step", 0) > 0:
        return None
    return float(record["train_seconds"])


def results_name(name: str, quick: bool) -> str:
    """The MNIST results file of benchmark `name`: <name>_mnist.json (quick: <name>_mnist_quick.json)."""
    return f"{name}_mnist{'_quick' if quick else ''}.json"


def missing_bench_models(runs: Path, names=BENCH_MODELS) -> list[str]:
    """The names among `names` whose finished model is not in runs/<name>/model (yet)."""
    return [name for name in names if not (Path(runs) / name / "model" / "config.json").is_file()]
