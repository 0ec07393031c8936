"""A fuzz over argument combinations for every `difflab` command, discovered from the typer app (so a
command added later is covered): missing required options, malformed values (non-numbers, negative,
zero, NaN, infinities, huge), unknown options, nonexistent input paths, contradictory combinations,
and an existing output without --force. Each must end with exit status 2 and one line on stderr
starting with "error:", no traceback, nothing on stdout and no new file in the working folder.

Cases are a deterministic product (command x option x bad value), each run in-process through
`difflab.apps.cli.app.main` in its own empty working folder, with a tripwire that fails the case if the
command accepts the arguments and starts working (a few seconds)."""
from __future__ import annotations

import os
import signal
import sys
from enum import Enum
from pathlib import Path

import pytest
import typer

import difflab.apps.cli.app as cli
import difflab.apps.cli.sample as sample_cli
from difflab import GaussianMixture
from tests.apps.cli.helpers import tripwire

MODEL = "@model"          # replaced by the path of a small GaussianMixture folder
PREDICTOR = "@predictor"  # a model folder that is not an AMED predictor

# A valid, quick invocation per command: the variants below change one thing in it. A command
# without one still gets the generic cases (missing required options, non-numbers, unknown option).
BASELINES: dict[tuple[str, ...], list[str]] = {
    ("train",): ["--data", "gmm", "--train-steps", "1", "--batch-size", "4", "--out", "m", "--device", "cpu"],
    ("sample",): ["--model", MODEL, "--solver", "euler", "--nfe", "3", "--n", "2", "--out", "s.npz",
                  "--device", "cpu"],
    ("info",): ["--model", MODEL],
    ("demo",): ["--quick", "--out", "demo", "--device", "cpu"],
    ("amed", "fit"): ["--model", MODEL, "--nfe", "3", "--trajectories", "4", "--batch-size", "4", "--out", "p",
                      "--device", "cpu"],
    ("amed", "grid"): ["--model", MODEL, "--nfe", "3", "--grid-method", "gits", "--fine-levels", "4", "--n-fit", "2",
                       "--n-eval", "2", "--out", "g", "--device", "cpu"],
    ("compose",): ["--models", MODEL, MODEL, "--mode", "or", "--nfe", "3", "--n", "2", "--out", "c.npz",
                   "--device", "cpu"],
    ("condition", "fit"): ["--model", MODEL, "--data", "gmm", "--task", "inpaint", "--pairs", "4", "--train-steps", "1",
                           "--out", "h", "--device", "cpu"],
}

# Contradictory or impossible combinations, each on top of the command's baseline: (option, value)
# pairs, value None for a flag.
CONTRADICTIONS: dict[tuple[str, ...], list[list[tuple[str, str | None]]]] = {
    ("train",): [[("--conditional", None)], [("--net", "unet")],
                 [("--net", "mlp"), ("--data", "digits")], [("--data", "nowhere/images")]],
    ("sample",): [[("--solver", "amed")], [("--predictor", PREDICTOR)],
                  [("--solver", "amed"), ("--predictor", PREDICTOR)],
                  [("--out", "s.png")], [("--out", "s.txt")], [("--out", "s")],
                  [("--solver", "heun"), ("--nfe", "36")], [("--solver", "rk45")], [("--grid", "spiral")],
                  [("--class", "3")], [("--solver", "heun"), ("--nfe", "1")],
                  [("--n", "100000000000000")], [("--n", "300"), ("--out", "g.png")]],
    ("amed", "fit"): [[("--base-solver", "heun")], [("--teacher-solver", "rk45")], [("--grid", "spiral")],
                      [("--nfe", "4")]],
    ("amed", "grid"): [[("--solver", "euler_maruyama")], [("--grid-method", "optimal")],
                       [("--solver", "deis"), ("--grid-method", "ld3")], [("--solver", "heun"), ("--nfe", "1")]],
}

# Values of numeric options that are meaningful, so not expected to be refused.
ALLOWED = {"--seed": {"0"}, "--M": {"0"},
           "train --divergence-rollbacks": {"0"},       # the default: no rollbacks
           "sample --batch-size": {str(10**30)},          # a batch larger than --n is clamped to it
           "sample --class": {"-1"}}                      # the null class: unconditional sampling
INT_VALUES = ["abc", "1.5", "", "nan", "-1", "0", str(10**30)]
FLOAT_VALUES = ["abc", "", "nan", "inf", "-inf", "1e400", "-1", "0"]
TRIPWIRE_SECONDS = 4.0

# Cases that fail today in commands outside `sample` (reported, not yet fixed). They are not run
# (most would train until the tripwire); delete an entry once its command refuses the case.
_HUGE = str(10**30)
KNOWN_BUGS: dict[str, str] = {}   # case id -> why it still fails (run=False, strict xfail)


def _commands():
    def walk(command, path):
        if getattr(command, "commands", None):     # a group (a single-command sub-app is a command)
            for name, sub in command.commands.items():
                yield from walk(sub, (*path, name))
        else:
            yield path, command

    return list(walk(typer.main.get_command(cli.app), ()))


COMMANDS = _commands()


def _annotation(param):
    return getattr(getattr(param, "type_descriptor", None), "annotation", None)


def _is_option(param) -> bool:
    return type(param).__name__.endswith("Option")


def _placeholder(param) -> list[str]:
    """A plausible value for a required parameter of a command without a baseline."""
    kind = _annotation(param)
    value = {int: "1", float: "1.0", Path: "placeholder"}.get(kind, "x")
    return [param.opts[0], value] if _is_option(param) else [value]


def _base_args(path, command) -> list[str]:
    if path in BASELINES:
        return list(BASELINES[path])
    return [arg for param in command.params if param.required for arg in _placeholder(param)]


def _with(args: list[str], option: str, value: str | None) -> list[str]:
    """args with `option` set to value (replacing its value if present); value None drops it."""
    args = list(args)
    if option in args:
        i = args.index(option)
        del args[i:i + 2]
    return args if value is None else [option, value, *args]   # first: click converts in command-line order


def _case(path, args, case_id):
    known = KNOWN_BUGS.get(case_id)
    marks = [pytest.mark.xfail(reason=known, run=False, strict=True)] if known else []
    return pytest.param(path, args, id=case_id, marks=marks)


def _cases():
    cases = []
    for path, command in COMMANDS:
        name = " ".join(path)
        base = _base_args(path, command)
        for param in command.params:
            if param.required and _is_option(param):
                cases.append(_case(path, _with(base, param.opts[0], None), f"{name}-missing-{param.name}"))
            if not _is_option(param):
                continue
            kind, option = _annotation(param), param.opts[0]
            if kind is bool:
                cases.append(_case(path, [f"{option}=maybe", *base], f"{name}-{param.name}=value"))
                continue
            values = {int: INT_VALUES, float: FLOAT_VALUES, str: ["bogus", ""]}.get(kind, [])
            if isinstance(kind, type) and issubclass(kind, Enum):
                values = ["bogus"]
            elif kind is Path and param.name != "out":
                values = ["nowhere"]                      # an input that does not exist
            if path not in BASELINES:                     # only what click itself must refuse
                values = [v for v in values if v in ("abc", "bogus")] if kind is not str else []
            for value in values:
                if value not in ALLOWED.get(option, set()) | ALLOWED.get(f"{name} {option}", set()):
                    cases.append(_case(path, _with(base, option, value), f"{name}-{param.name}={value!r}"))
        cases.append(_case(path, [*base, "--no-such-option"], f"{name}-unknown-option"))
        for extra in CONTRADICTIONS.get(path, []):
            args = base
            for option, value in extra:
                args = [option, *args] if value is None else _with(args, option, value)
            label = "_".join(o if v is None else f"{o}={v}" for o, v in extra)
            cases.append(_case(path, args, f"{name}-contradiction-{label}"))
    return cases


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "gmm"
    GaussianMixture([[-2.0, 0.0], [2.0, 1.0]], stds=[0.5, 0.8], weights=[0.4, 0.6]).save(folder)
    return folder


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run_in(folder: Path, path: tuple[str, ...], args: list[str], model: Path, capsys) -> tuple[int, str, str]:
    """`difflab PATH ARGS` in-process in `folder`, stopped by the tripwire if it starts working."""
    args = [str(model) if a in (MODEL, PREDICTOR) else a for a in args]
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["difflab", *path, *args]
    os.chdir(folder)

    previous = signal.signal(signal.SIGALRM, tripwire)
    signal.setitimer(signal.ITIMER_REAL, TRIPWIRE_SECONDS)
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        sys.argv = old_argv
        os.chdir(old_cwd)
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, out: str, err: str, before: list[str], after: list[str]) -> None:
    lines = err.splitlines()
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert "Traceback" not in err and out == ""
    assert after == before, "a refused command left files behind"


# Commands fuzzed with the generic cases only (click's own refusals): a valid baseline needs a
# class-conditional network model or held-out data. A new command must get a baseline or be listed here.
GENERIC_ONLY = {"condition run", "distill guided", "distill progressive"}


@pytest.mark.reliability("cli input")
def test_every_command_has_a_baseline_or_is_listed_as_generic_only():
    uncovered = {" ".join(path) for path, _ in COMMANDS if path not in BASELINES}
    assert uncovered == GENERIC_ONLY


@pytest.mark.parametrize("path, args", _cases())
@pytest.mark.reliability("cli input")
def test_bad_arguments_end_in_one_line_and_status_2_and_leave_nothing(path, args, model_folder, tmp_path, capsys):
    before = _listing(tmp_path)
    code, out, err = run_in(tmp_path, path, args, model_folder, capsys)
    assert_refused(code, out, err, before, _listing(tmp_path))


def _existing_output_cases():
    with_out = [path for path, command in COMMANDS if path in BASELINES
                and "--out" in [o for param in command.params for o in getattr(param, "opts", [])]]
    return [_case(path, existing, f"{' '.join(path)}-existing-{existing}")
            for path in with_out for existing in ("file", "folder")]


@pytest.mark.parametrize("path, existing", _existing_output_cases())
@pytest.mark.reliability("outputs")
def test_an_existing_output_is_kept_without_force(path, existing, model_folder, tmp_path, capsys):
    args = BASELINES[path]
    target = tmp_path / args[args.index("--out") + 1]
    if existing == "file":
        target.write_bytes(b"keep me")
    else:
        target.mkdir()
        (target / "keep.txt").write_bytes(b"keep me")
    before = _listing(tmp_path)
    code, out, err = run_in(tmp_path, path, args, model_folder, capsys)
    assert_refused(code, out, err, before, _listing(tmp_path))
    assert (target.read_bytes() if existing == "file" else (target / "keep.txt").read_bytes()) == b"keep me"


@pytest.mark.reliability("outputs")
def test_ctrl_c_ends_with_a_non_zero_status_and_no_file(model_folder, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_cli, "_solver_runner", interrupted)
    code, _, _ = run_in(tmp_path, ("sample",), BASELINES[("sample",)], model_folder, capsys)
    assert list(tmp_path.iterdir()) == []
    assert code != 0


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=[" ".join(p) for p, _ in COMMANDS])
@pytest.mark.reliability("cli input")
def test_help_works_for_every_command(path, model_folder, tmp_path, capsys):
    code, out, err = run_in(tmp_path, path, ["--help"], model_folder, capsys)
    assert code == 0 and "Usage" in out and err == ""
