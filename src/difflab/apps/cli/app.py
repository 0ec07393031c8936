"""The `difflab` command (typer + rich). Every difflab error becomes one line and exit status 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from typer.core import TyperCommand

from difflab.apps.cli.common import MAX_SEED, Device, fail, greedy_options, resolve_device
from difflab.core.errors import DifflabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="difflab: get more out of trained diffusion models (σ-space denoisers, exact "
                       "Gaussian-mixture checks, few-step sampling, composition, inverse problems, distillation).")

from difflab.apps.cli import amed, compose, condition, distill, sample, train  # noqa: E402

app.command(cls=greedy_options(TyperCommand, ("--keep-classes",)))(train.train)
app.command()(sample.sample)
app.add_typer(amed.app, name="amed")
app.add_typer(compose.app, name="compose")
app.add_typer(condition.app, name="condition")
app.add_typer(distill.app, name="distill")


@app.command()
def info(model: Path = typer.Argument(..., help="model folder")) -> None:
    """Print a model folder's config and parameter count as JSON."""
    from difflab.models import info as model_info

    typer.echo(json.dumps(model_info(model), indent=2, sort_keys=True, default=str))


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="output folder"),
    quick: bool = typer.Option(False, help="a short run (smoke test)"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED),
    device: Device = typer.Option(Device.auto),
    force: bool = typer.Option(False, help="write into an existing folder that is not a demo folder"),
) -> None:
    """The main job: every capability end to end on embedded data, into OUT/report.html (+ report.json)."""
    from difflab.apps.demo.run import check_demo_folder, run_demo

    check_demo_folder(out, force)
    summary = run_demo(out, quick=quick, seed=seed, device=resolve_device(device))
    typer.echo(json.dumps(summary, indent=2))


def main() -> None:
    try:
        status = app(standalone_mode=False)
    except (DifflabError, FileExistsError) as err:
        fail(str(err))
    except Exception as err:  # click's usage errors arrive here in non-standalone mode
        if hasattr(err, "format_message"):
            fail(" ".join(err.format_message().split()))        # one line, whatever click wrapped
        if type(err).__name__ == "Abort":
            fail("aborted")
        raise
    if isinstance(status, int) and status != 0:               # e.g. 130 after Ctrl-C
        sys.exit(status)


if __name__ == "__main__":
    main()
