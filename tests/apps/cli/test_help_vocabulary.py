"""One CLI vocabulary: every option name means one thing across all `difflab` commands.

"Meaning" is a row of docs/cli.md's option table (option | meaning | commands). The commands are
found by walking the typer app (as test_fuzz.py does, so a command added later is covered), and
each option's name and help are read from click. The test fails when a command takes an option the
table does not define, takes it without the table listing that command, or describes it without the
row's key phrase (the **bold** words of the meaning); when one name is a flag in one command and takes
values in another; when the table defines an option, or lists a command for it, that no longer
exists; and when a command takes a positional argument (inputs are named options: `--model`).
Every `difflab ...` line of the README's and docs' code blocks must also parse with today's options.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer

import difflab.apps.cli.app as cli

ROOT = Path(__file__).resolve().parents[3]
VOCABULARY = ROOT / "docs" / "cli.md"
DOCUMENTED_COMMANDS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# names that meant two things before the vocabulary (kept out for good): what to use instead
RETIRED = {"--steps": "--train-steps (optimiser steps) or --nfe (model evaluations)",
           "--from": "--from-steps", "--to": "--to-steps", "--steps-per-round": "--train-steps-per-round",
           "--weight": "--pigdm-weight (ΠGDM) or --w (classifier-free guidance)",
           "--teacher-steps": "--from-steps"}


@dataclass(frozen=True)
class Row:
    """One meaning: the option's names (`--sde` / `--ode`), its key phrase and the commands that take it."""

    names: tuple[str, ...]
    key_phrase: str
    commands: frozenset[str]

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass(frozen=True)
class Param:
    """One parameter of one command, as click sees it."""

    command: str          # "condition fit"
    names: tuple[str, ...]  # primary then secondary option names; () for a positional argument
    help: str
    kind: str             # "flag", "value", "list" or "N values"
    label: str            # how messages name it

    @property
    def name(self) -> str:
        return self.names[0] if self.names else self.label


def vocabulary_rows(text: str) -> list[Row]:
    """The rows of the table under `## Options` in docs/cli.md's text."""
    section = text[text.index("## Options"):]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`-"):
            continue
        names = tuple(re.findall(r"`(-[^`]+)`", cells[0]))
        key = re.search(r"\*\*(.+?)\*\*", cells[1])
        rows.append(Row(names, key.group(1) if key else "", frozenset(re.findall(r"`([^`]+)`", cells[2]))))
    return rows


def _walk(command, path=()):
    if getattr(command, "commands", None):         # a group (a group without subcommands is a command)
        for name, sub in command.commands.items():
            yield from _walk(sub, (*path, name))
    else:
        yield " ".join(path), command


def _kind(param) -> str:
    if getattr(param, "is_flag", False):
        return "flag"
    if getattr(param, "multiple", False):
        return "list"
    return "value" if param.nargs == 1 else f"{param.nargs} values"


def cli_params(app: typer.Typer) -> list[Param]:
    """Every parameter of every `difflab` command but --help."""
    params = []
    for command_name, command in _walk(typer.main.get_command(app)):
        for param in command.params:
            if param.name == "help":
                continue
            is_option = type(param).__name__.endswith("Option")    # typer vendors its own click
            names = tuple(param.opts) + tuple(param.secondary_opts) if is_option else ()
            label = names[0] if is_option else param.name.upper()
            params.append(Param(command_name, names, getattr(param, "help", None) or "", _kind(param), label))
    return params


def vocabulary_problems(params: list[Param], rows: list[Row]) -> list[str]:
    """What breaks "one name, one meaning" between the commands' parameters and the table's rows."""
    problems = []
    by_name: dict[str, Row] = {}
    for row in rows:
        if row.name in by_name:
            problems.append(f"docs/cli.md defines {row.name} twice: one name, one meaning")
        if not row.key_phrase:
            problems.append(f"docs/cli.md's row for {row.name} has no **key phrase**")
        by_name[row.name] = row
    taken: dict[str, dict[str, Param]] = {}
    for param in params:
        if not param.names:
            problems.append(f"`difflab {param.command}` takes a positional argument {param.label}; "
                            "inputs are named options (docs/cli.md)")
            continue
        taken.setdefault(param.name, {})[param.command] = param
        row = by_name.get(param.name)
        if row is None:
            problems.append(f"`difflab {param.command}` takes {param.name}, which docs/cli.md's option table "
                            "does not define")
            continue
        if param.command not in row.commands:
            problems.append(f"`difflab {param.command}` takes {param.name}, but docs/cli.md's row for it (one "
                            f"meaning: {row.key_phrase!r}) does not list `{param.command}`")
        if row.key_phrase.casefold() not in param.help.casefold():
            problems.append(f"`difflab {param.command} --help` says {param.name} is {param.help!r}, without the "
                            f"meaning docs/cli.md gives it: {row.key_phrase!r}")
        stale = set(row.names) - set(param.names)
        if stale:
            problems.append(f"docs/cli.md names {sorted(stale)} in the row of {param.name}; "
                            f"`difflab {param.command}` knows {list(param.names)}")
    for name, by_command in taken.items():
        kinds = {command: param.kind for command, param in by_command.items()}
        if len(set(kinds.values())) > 1:
            problems.append(f"{name} is not one kind of option across commands: {kinds}")
    for row in rows:
        if row.name not in taken:
            problems.append(f"docs/cli.md defines {row.name}, which no command takes any more")
            continue
        for command in sorted(row.commands - set(taken[row.name])):
            problems.append(f"docs/cli.md lists `{command}` for {row.name}, which `difflab {command}` does not take")
    return problems


def test_every_option_has_its_one_documented_meaning():
    problems = vocabulary_problems(cli_params(cli.app), vocabulary_rows(VOCABULARY.read_text(encoding="utf-8")))
    assert not problems, "\n".join(problems)


def test_retired_names_are_gone():
    names = {name for param in cli_params(cli.app) for name in param.names}
    for old, new in RETIRED.items():
        assert old not in names, f"{old} is back; it meant two things before: use {new}"


def _drift(command: str, name: str, help: str, kind: str) -> Param:
    return Param(command, (name,), help, kind, name)


# the CLI before the vocabulary, in the parts that drifted
OLD_STEPS = [_drift("train", "--steps", "optimiser steps", "value"),
             _drift("sample", "--steps", "a distilled student (`difflab distill`): its number of steps", "value")]
OLD_CLASSES = [_drift("train", "--classes", "class-conditional (with a null class for guidance)", "flag"),
               _drift("compose", "--classes", "two or more class labels of --model: --classes 3 8", "list")]


def test_the_old_drift_fails():
    rows = vocabulary_rows(VOCABULARY.read_text(encoding="utf-8"))
    problems = "\n".join(vocabulary_problems(OLD_STEPS + OLD_CLASSES, rows))
    assert "takes --steps, which docs/cli.md's option table does not define" in problems
    assert "`difflab train` takes --classes, but docs/cli.md's row for it" in problems
    assert "--classes is not one kind of option across commands" in problems
    # documenting --steps once, as optimiser steps, for both commands does not make it one meaning
    steps = Row(("--steps",), "optimiser steps", frozenset({"train", "sample"}))
    problems = "\n".join(vocabulary_problems(OLD_STEPS, [steps]))
    assert "`difflab sample --help` says --steps is" in problems and "train --help" not in problems


def test_a_stale_row_fails():
    rows = [Row(("--train-steps",), "optimiser steps", frozenset({"train", "distill progressive"}))]
    params = [_drift("train", "--train-steps", "optimiser steps", "value")]
    problems = vocabulary_problems(params, rows + [Row(("--from",), "the teacher's steps", frozenset({"x"}))])
    assert any("lists `distill progressive` for --train-steps" in p for p in problems)
    assert any("defines --from, which no command takes" in p for p in problems)


def documented_command_lines(path: Path) -> list[tuple[str, list[str]]]:
    """(where, argv after `difflab`) of each `difflab` command in the code blocks of a markdown file; usage
    synopses (`[--w W]`, `a | b`, `…`) are skipped."""
    text = path.read_text(encoding="utf-8")
    found = []
    for block in re.finditer(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        first_line = text.count("\n", 0, block.start(1)) + 1
        starts = [0] + [m.end() for m in re.finditer(r"(?<!\\)\n", block.group(1))]    # of each joined line
        joined = re.sub(r"\\\n", " ", block.group(1)).splitlines()
        for start, line in zip(starts, joined):
            offset = block.group(1).count("\n", 0, start)
            line = line.split("-m difflab.apps.cli.app ", 1)[-1] if "-m difflab.apps.cli.app " in line else line
            line = re.sub(r"^\s*difflab\s+", "difflab ", line)
            if not line.startswith("difflab "):
                continue
            argv = shlex.split(line, comments=True)[1:]
            if any(token == "|" or token.startswith("[") or "…" in token or "..." in token for token in argv):
                continue
            found.append((f"{path.name}:{first_line + offset}", argv))
    return found


def _parse(argv: list[str]) -> None:
    command, name, args = typer.main.get_command(cli.app), "difflab", list(argv)
    while getattr(command, "commands", None) and args and args[0] in command.commands:
        name = args.pop(0)
        command = command.commands[name]
    with command.make_context(name, args):
        pass


DOCUMENTED = [case for path in DOCUMENTED_COMMANDS for case in documented_command_lines(path)]


def test_the_docs_document_commands():
    assert len(DOCUMENTED) >= 20 and any(where.startswith("cli.md") for where, _ in DOCUMENTED)


@pytest.mark.parametrize("where, argv", DOCUMENTED, ids=[where for where, _ in DOCUMENTED])
def test_documented_commands_parse(where, argv):
    try:
        _parse(argv)
    except Exception as err:                       # click's usage errors (typer vendors its own click)
        if not hasattr(err, "format_message"):
            raise
        pytest.fail(f"{where}: `difflab {' '.join(argv)}`: {err.format_message()}")
