"""The README's quickstart, run as written: its bash and python blocks top to bottom in one empty
folder (bash lines through the `difflab` command in-process, python blocks in one namespace), then
the diffusers-pipeline block, with fewer steps, trajectories and samples (SCALE_DOWN, the only
change made to the text). Documented values (`expr  # {'parameters': ...}`) are checked too.

To run the README verbatim, with no scale-downs (tens of minutes on a CPU):

    DIFFLAB_README_FULL=1 .venv/bin/python -m pytest tests/test_readme.py
"""
from __future__ import annotations

import ast
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import difflab
from difflab.apps.cli.app import app

README = Path(__file__).resolve().parents[1] / "README.md"
QUICKSTART = ("## Quickstart, one capability at a time", "### Notes on the solvers")
PIPELINE = "### difflab's solvers inside a diffusers pipeline"
STABLE_DIFFUSION = ("## Your Stable Diffusion (or other diffusers) model", "\n## ")
FULL = os.environ.get("DIFFLAB_README_FULL") == "1"

# (README text, what runs instead): each must occur in the blocks at least once, so a README edit
# that drops one fails here rather than running for minutes. Nothing else is changed.
SCALE_DOWN = [
    ("--train-steps 1000 ", "--train-steps 2 "),        # difflab train, distill guided: optimiser steps
    ("--train-steps 2000 ", "--train-steps 2 "),        # condition fit
    ("--train-steps 500 ", "--train-steps 2 "),         # the cU-Net
    ("steps=2000)", "steps=2)"),                        # fit_deft
    ("trajectories=4096)", "trajectories=8)"),          # fit_amed
    # difflab amed fit: 8 trajectories on a 2-step model cannot beat the base solver, and the command
    # refuses to save a fit that does not (never worse); the scaled run saves it anyway to go on
    ("--trajectories 4096 ", "--trajectories 8 --save-if-worse "),
    ("--n 20000 ", "--n 8 "),                           # the streamed .npz
    # fit_grid (the defaults: a 100-level teacher, 256 held-out draws, 300 LD3 steps), and difflab amed grid, where
    # 2 LD3 steps on a 2-step model need not beat Karras (never worse: refused unless saved anyway)
    ("fine_levels=100, n_eval=256, train_steps=300)", "fine_levels=6, n_eval=4, train_steps=2)"),
    ("--fine-levels 100 --n-eval 256 --train-steps 300 --out", "--fine-levels 6 --n-eval 4 --train-steps 2 "
     "--save-if-worse --out"),
    ("--nfe 100 ", "--nfe 3 "),                         # difflab compose
    ('get_sigmas("karras", 101,', 'get_sigmas("karras", 4,'),   # superdiff's grid
    ("--pairs 1000 ", "--pairs 16 "),                   # condition fit
    ("--from-steps 32 ", "--from-steps 8 "),            # distill progressive: rounds 8 → 4 → 2 → 1
    ("--train-steps-per-round 300 ", "--train-steps-per-round 1 "),
]


def _section(text: str, start: str, end: str | None) -> tuple[str, int]:
    """The README text from the heading `start` to `end` (or the next ### heading), and its first line number."""
    begin = text.index(start)
    stop = text.index(end, begin) if end else text.index("\n### ", begin + len(start))
    return text[begin:stop], text.count("\n", 0, begin) + 1


def readme_blocks() -> list[tuple[str, str, int]]:
    """(language, code, first README line of the code) of the quickstart's bash and python blocks in
    order, then the diffusers-pipeline python block."""
    text = README.read_text(encoding="utf-8")
    blocks = []
    for section, first_line in (_section(text, *QUICKSTART), _section(text, PIPELINE, None)):
        for match in re.finditer(r"^```(bash|python)\n(.*?)^```", section, re.S | re.M):
            line = first_line + section.count("\n", 0, match.start(2))
            blocks.append((match.group(1), match.group(2), line))
    return blocks


def scale_down(blocks: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    for old, new in SCALE_DOWN:
        assert sum(code.count(old) for _, code, _ in blocks), f"scale-down {old!r} no longer occurs in the README"
        assert "\n" not in old + new                                        # line numbers stay the README's
    scaled = []
    for language, code, line in blocks:
        for old, new in SCALE_DOWN:
            code = code.replace(old, new)
        scaled.append((language, code, line))
    return scaled


def bash_commands(code: str) -> list[str]:
    """The commands of a bash block: `\\` continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def run_bash(code: str, line: int) -> None:
    runner = CliRunner()
    for command in bash_commands(code):
        argv = shlex.split(command, comments=True)
        assert argv[0] == "difflab", f"README.md:{line}: only difflab commands can run here, got {command!r}"
        result = runner.invoke(app, argv[1:], catch_exceptions=False)
        assert result.exit_code == 0, f"README.md:{line}: `{command}` failed:\n{result.output}"


def run_python(code: str, line: int, namespace: dict) -> None:
    """exec the block statement by statement in `namespace` (tracebacks name README lines); an
    expression statement whose line ends in a comment holding a Python literal must equal it."""
    source = "\n" * (line - 1) + code
    lines = source.splitlines()
    for statement in ast.parse(source, "README.md").body:
        if not isinstance(statement, ast.Expr):
            exec(compile(ast.Module([statement], []), "README.md", "exec"), namespace)
            continue
        value = eval(compile(ast.Expression(statement.value), "README.md", "eval"), namespace)
        comment = lines[statement.end_lineno - 1].partition("  # ")[2]
        try:
            documented = ast.literal_eval(comment)
        except (ValueError, SyntaxError):
            continue                                    # prose, not a value
        assert value == documented, f"README.md:{statement.lineno}: the README says {documented}, got {value}"


def test_readme_blocks_are_found_in_order():
    languages = [language for language, _, _ in readme_blocks()]
    assert languages[:3] == ["python", "bash", "python"] and languages[-1] == "python"
    assert languages.count("bash") >= 6 and languages.count("python") >= 6


def test_every_readme_command_is_difflab():
    for language, code, line in readme_blocks():
        if language == "bash":
            for command in bash_commands(code):
                assert shlex.split(command, comments=True)[0] == "difflab", f"README.md:{line}: {command}"


def test_readme_quickstart_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = readme_blocks() if FULL else scale_down(readme_blocks())
    namespace: dict = {"__name__": "readme"}
    for language, code, line in blocks:
        if language == "bash":
            run_bash(code, line)
        else:
            run_python(code, line, namespace)

    # the models and files the commands made exist and load
    model = difflab.load("runs/digits")
    assert model.data_shape == (1, 8, 8) and model.meta["num_classes"] == 10
    n_streamed = 20000 if FULL else 8
    assert np.load("samples.npz")["x"].shape == (n_streamed, 1, 8, 8)
    for half, kept in (("0to4", [0, 1, 2, 3, 4]), ("5to9", [5, 6, 7, 8, 9])):
        assert difflab.load(f"runs/digits-{half}").meta["kept_classes"] == kept
    composed = np.load("and.npz")
    assert composed["x"].shape == (64, 1, 8, 8) and composed["log_q"].shape == (64, 2)
    assert isinstance(difflab.load("runs/digits-cunet").net, namespace["CUNet"])
    assert difflab.load("runs/student-1").steps == 1
    for folder in ("runs/digits-amed5", "runs/deft-inpaint", "runs/student-w", "runs/student-1.rounds/steps-0004"):
        assert (Path(folder) / "config.json").is_file(), folder
    for image in ("u5.png", "amed5.png", "or.png", "recon.png", "fours.png"):
        assert Path(image).stat().st_size > 0, image

    # and the python blocks' values have the shapes the README says
    # p(x0 | x0[0] + 0.1·n = 1.5) is the right component pulled to x0[0] = 1.55 ± 0.095 (256 samples: ± 0.006)
    posterior_samples = namespace["post"].sample(256, generator=torch.Generator().manual_seed(0))
    assert abs(float(posterior_samples[:, 0].mean()) - 1.55) < 0.03
    for name in ("digits", "threes", "x0", "x0_dps"):
        assert namespace[name].shape == (64, 1, 8, 8) and torch.isfinite(namespace[name]).all(), name
    assert namespace["result"].log_q.shape == (64, 2)
    assert namespace["y"].shape[0] == 64
    assert len(namespace["images"]) == 1 and namespace["images"][0].size == (8, 8)


@pytest.mark.parametrize("old, new", SCALE_DOWN)
def test_scale_downs_change_only_numbers(old, new):
    """Each substitution keeps the text around the number, so the scaled README is the README (the one
    flag a scaled run may add: --save-if-worse, for a fit too small to improve on its base)."""
    assert re.sub(r"\d+", "N", old) == re.sub(r"\d+", "N", new.replace("--save-if-worse ", ""))


def test_readme_stable_diffusion_section_runs_on_a_tiny_pipeline(tmp_path, monkeypatch):
    """The "Your Stable Diffusion" section as written: its python blocks build a tiny random pipeline
    (save_tiny_pipeline), sample it with a prompt and CFG, decode, and run it in a stock diffusers pipeline."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    text = README.read_text(encoding="utf-8")
    section, first_line = _section(text, *STABLE_DIFFUSION)
    blocks = list(re.finditer(r"^```python\n(.*?)^```", section, re.S | re.M))
    assert len(blocks) >= 2
    namespace: dict = {"__name__": "readme"}
    for match in blocks:
        run_python(match.group(1), first_line + section.count("\n", 0, match.start(1)), namespace)
    assert torch.isfinite(namespace["latents"]).all()
    assert namespace["image"].size == (16, 16)
