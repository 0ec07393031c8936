"""Property-based fuzzing of every `difflab` command (discovered from the typer app, as test_fuzz.py does):
hypothesis draws argument lists from the command's real options and junk option names, with values
from a mix of valid-looking ones and hostile ones (huge and negative numbers, NaN, infinities, empty
and long strings, paths into /proc or under a regular file), on top of nothing or of the command's
working baseline (test_fuzz.BASELINES).

Every case must end in one of: the command starting real work (the tripwire stops it after
TRIPWIRE_SECONDS), exit status 0, or exit status 2 with one line on stderr starting with "error:". Never a
traceback; never a half-written file (a hidden `.NAME.*.tmp`, `.NAME.old` or `.NAME.lock`) in the
case's working folder, nor any new file after a refusal but kept checkpoints; never more than
MAX_MEMORY_GROWTH of resident memory (the peak, reset before each case through /proc/self/clear_refs).

The draws are derandomised (the same cases every run); DIFFLAB_FUZZ_SEED=N draws another set.
"""
from __future__ import annotations

import os
import resource
import signal
import sys
import tempfile
from enum import Enum
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

import difflab.apps.cli.app as cli
from tests.apps.cli.helpers import StartedWork, tripwire
from tests.apps.cli.test_fuzz import BASELINES, COMMANDS, MODEL, PREDICTOR

TRIPWIRE_SECONDS = 1.0
MAX_MEMORY_GROWTH = 1 << 30            # bytes of resident memory a case may add at its peak
ADDRESS_SPACE_ROOM = 4 << 30           # a guard: beyond this much new address space, allocations fail
UNDER_FILE = "@under-file"             # replaced by a path below a regular file
FUZZ_SEED = os.environ.get("DIFFLAB_FUZZ_SEED")

JUNK_OPTIONS = ["--no-such-option", "--", "-", "-x", "---out", "--OUT", "--train_steps", "--out=", "--help=1"]
HOSTILE = ["-1", "0", str(10**30), str(2**63), str(-(2**63) - 1), "nan", "-nan", "inf", "-inf", "1e400", "-1e-400",
           "", " ", "x" * 5000, "☃" * 300, "/proc/self/status", "/proc/self/mem", "/proc/1/no/such", "/proc/x.npz",
           f"{UNDER_FILE}/o", f"{UNDER_FILE}/o.npz", "..", ".", "--force"]
WORDS = {"data": ["moons", "gmm", "rings", "digits"], "solver": ["euler", "heun", "dpm2", "unipc", "amed"],
         "grid": ["karras", "logsnr", "discrete"], "base_solver": ["dpm2", "euler", "ipndm"],
         "teacher_solver": ["heun", "dpm2"]}


def _annotation(param):
    return getattr(getattr(param, "type_descriptor", None), "annotation", None)


def _valid_values(param) -> list[str]:
    kind = _annotation(param)
    if isinstance(kind, type) and issubclass(kind, Enum):
        return [member.value for member in kind]
    if param.name == "out":
        return ["o", "o.npz", "o.png", "sub/o"]
    if kind is Path or "Path" in str(kind):
        return [MODEL, PREDICTOR, "nowhere"]
    if kind is float or "float" in str(kind):
        return ["0.5", "1", "0.01", "3"]
    if kind is int or "int" in str(kind):
        return ["1", "2", "3", "5"]
    return WORDS.get(param.name, ["x"])


@st.composite
def option_strategy(draw, command):
    """One option as a list of tokens: a real option with valid-looking or hostile values, or junk."""
    options = [p for p in command.params if type(p).__name__.endswith("Option")]
    if not options or draw(st.integers(0, 5)) == 0:
        return [draw(st.sampled_from(JUNK_OPTIONS))]
    param = draw(st.sampled_from(options))
    name = draw(st.sampled_from([*param.opts, *getattr(param, "secondary_opts", [])]))
    if param.is_flag:
        return [name] if draw(st.booleans()) else [f"{name}={draw(st.sampled_from(['maybe', '', '1']))}"]
    value = st.one_of(st.sampled_from(_valid_values(param)), st.sampled_from(HOSTILE))
    count = max(param.nargs, 1) if not param.multiple else draw(st.integers(1, 3))
    return [name, *(draw(value) for _ in range(count))]


@st.composite
def case_strategy(draw):
    path, command = draw(st.sampled_from(COMMANDS))
    base = list(BASELINES.get(path, [])) if draw(st.booleans()) else []
    args = base
    for _ in range(draw(st.integers(0 if base else 1, 3))):
        tokens = draw(option_strategy(command))
        if tokens[0] in args and len(tokens) == 2:                  # replace the baseline's value
            i = args.index(tokens[0])
            args = [*args[:i], *args[i + 2:]]
        args = [*tokens, *args] if draw(st.booleans()) else [*args, *tokens]
    return path, args


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """The model folder (a GaussianMixture), a model folder that is no AMED predictor, a regular file."""
    from difflab import GaussianMixture

    folder = tmp_path_factory.mktemp("fuzz-inputs")
    GaussianMixture([[-2.0, 0.0], [2.0, 1.0]], stds=[0.5, 0.8], weights=[0.4, 0.6]).save(folder / "gmm")
    (folder / "regular").write_bytes(b"a regular file")
    return {MODEL: str(folder / "gmm"), PREDICTOR: str(folder / "gmm"), UNDER_FILE: str(folder / "regular")}


def _substitute(args: list[str], places: dict[str, str]) -> list[str]:
    out = []
    for arg in args:
        for marker, place in places.items():
            arg = arg.replace(marker, place) if arg.startswith(marker) else arg
        out.append(arg)
    return out


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def _reset_peak_memory() -> int:
    """Reset the peak resident memory to the current one (Linux >= 4.0); returns the current, bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


def _peak_memory() -> int:
    """The peak resident memory since the last reset, bytes (VmHWM: what clear_refs resets)."""
    return _status_kb("VmHWM") * 1024


def run_case(folder: Path, argv: list[str]) -> tuple[int | str, int]:
    """`difflab ARGV` in-process in `folder`: (exit status, or "started" if the tripwire stopped it;
    the resident memory it added at its peak, bytes). New address space is capped as a guard."""
    old_argv, old_cwd = sys.argv, os.getcwd()
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    sys.argv = ["difflab", *argv]
    os.chdir(folder)
    previous = signal.signal(signal.SIGALRM, tripwire)
    rss_before = _reset_peak_memory()
    resource.setrlimit(resource.RLIMIT_AS, (_status_kb("VmSize") * 1024 + ADDRESS_SPACE_ROOM, old_limit[1]))
    signal.setitimer(signal.ITIMER_REAL, TRIPWIRE_SECONDS)
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except StartedWork:
        code = "started"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, old_limit)
        signal.signal(signal.SIGALRM, previous)
        sys.argv = old_argv
        os.chdir(old_cwd)
    return code, _peak_memory() - rss_before


def _kept_checkpoint(name: str) -> bool:
    """A checkpoint a failed fit keeps on purpose (a non-finite loss keeps the last good one)."""
    return any(part.endswith((".checkpoints", ".rounds")) for part in Path(name).parts)


@pytest.mark.reliability("cli input")
@pytest.mark.timeout(600)
@settings(max_examples=300, deadline=None, derandomize=FUZZ_SEED is None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@seed(int(FUZZ_SEED or 0))
@given(case=case_strategy())
def test_any_arguments_start_work_or_end_in_one_line_with_status_2(case, places, tmp_path, capsys):
    path, args = case
    argv = [*path, *_substitute(args, places)]
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    before = _listing(folder)
    capsys.readouterr()
    code, memory_growth = run_case(folder, argv)
    out, err = capsys.readouterr()
    after = _listing(folder)
    event(f"{' '.join(path)}: {code}")      # the outcomes' tally: pytest --hypothesis-show-statistics
    shown = f"difflab {' '.join(a if len(a) < 60 else a[:60] + '…' for a in argv)}"

    assert "Traceback" not in err, f"{shown}\n{err[-3000:]}"
    assert memory_growth < MAX_MEMORY_GROWTH, f"{shown}: {memory_growth / 2**20:.0f} MiB more resident memory"
    half_written = [name for name in after if any(part.startswith(".") for part in Path(name).parts)]
    assert half_written == [], f"{shown}: left {half_written}"
    if code in ("started", 0):
        return
    lines = err.splitlines()
    assert code == 2, f"{shown}: status {code}\n{err[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{shown}\n{err[-3000:]}"
    assert [n for n in after if n not in before and not _kept_checkpoint(n)] == [], f"{shown}: refused, left files"


@pytest.mark.reliability("cli input")
@pytest.mark.parametrize("argv", [
    ["info", "--model", "x" * 5000],
    ["train", "--data", "x" * 5000, "--train-steps", "1", "--out", "m", "--device", "cpu"],
], ids=["info --model", "train --data"])
def test_a_path_too_long_for_the_file_system_is_one_line_not_a_traceback(argv, tmp_path, capsys):
    """Found by the fuzz above: the OSError (ENAMETOOLONG) of a 5,000-character input path was a traceback."""
    code, _ = run_case(tmp_path, argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: x"), err[-2000:]
    assert "File name too long" in err and len(err) < 200 and _listing(tmp_path) == []
