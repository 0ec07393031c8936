"""The `difflab` command (typer + rich). Every difflab error becomes one line and exit status 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand

from difflab.apps.cli.common import (
    DEVICE_OPTION,
    MAX_SEED,
    Device,
    check_output,
    fail,
    greedy_options,
    resolve_device,
    writes_output,
)
from difflab.core.errors import DifflabError
from difflab.core.io import dumps_strict

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
def info(model: Path = typer.Option(..., help="model folder (difflab or diffusers)")) -> None:
    """Print a model folder's config and parameter count as JSON."""
    from difflab.models import info as model_info

    typer.echo(json.dumps(model_info(model), indent=2, sort_keys=True, default=str))


@app.command()
@writes_output
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="report folder to write (report.html, report.json, figures)"),
    quick: bool = typer.Option(False, help="a short run (smoke test)"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="random seed of every section"),
    device: Device = DEVICE_OPTION,
    data: str = typer.Option("digits", help="image data set of the report: digits (embedded) | mnist (28x28, "
                                            "after `make data`)"),
    model: Optional[Path] = typer.Option(None, help="a trained image model folder of --data to use instead of "
                                                    "training the base one (e.g. runs/bench/mnist/full/model)"),
) -> None:
    """The main job: every capability end to end on embedded data, into OUT/report.html (+ report.json).

    OUT is an empty or new folder, or an earlier demo's folder (its trained models are reused);
    any other folder is refused, so the demo never writes among someone else's files. --data mnist
    runs every image section on MNIST (about 15 minutes with --quick on one CPU core).
    """
    from difflab.apps.demo.datasets import image_data
    from difflab.apps.demo.run import run_demo

    image_data(data)   # an unknown name fails before OUT is touched
    check_output(out, False, demo=True)
    summary = run_demo(out, quick=quick, seed=seed, device=resolve_device(device), data=data, model=model)
    typer.echo(dumps_strict(summary, indent=2))


def main() -> None:
    try:
        status = app(standalone_mode=False)
    except (DifflabError, FileExistsError) as err:
        fail(str(err))
    except OSError as err:    # the file system refused a path given (a name too long, no permission): say which
        fail(_os_error_line(err))
    except Exception as err:  # click's usage errors arrive here in non-standalone mode
        if hasattr(err, "format_message"):
            fail(" ".join(err.format_message().split()))        # one line, whatever click wrapped
        if type(err).__name__ == "Abort":
            fail("aborted")
        raise
    if isinstance(status, int) and status != 0:               # e.g. 130 after Ctrl-C
        sys.exit(status)


def _os_error_line(err: OSError, keep: int = 80) -> str:
    """'PATH: reason' for an OSError, the path shortened to `keep` characters."""
    if err.filename is None:
        return " ".join(str(err).split())
    path = str(err.filename)
    return f"{path if len(path) <= keep else path[:keep] + '…'}: {err.strerror or err}"


if __name__ == "__main__":
    main()
