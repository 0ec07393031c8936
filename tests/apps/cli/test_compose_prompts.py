"""`difflab compose` on tiny random Stable Diffusion folders: SuperDiff over one model's prompts and over two
pipelines each with its own prompt, decoded into images; every mistake one `error:` line and exit status 2."""
from __future__ import annotations

import json

import numpy as np
import pytest

from difflab import GaussianMixture
from tests.apps.cli.helpers import run

pytest.importorskip("diffusers")
pytest.importorskip("difflab.interop.diffusers.text_to_image")

FAST = ["--nfe", "3", "--n", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_pipeline):
    root = tmp_path_factory.mktemp("compose-prompts")
    GaussianMixture([[-1.0, 0.0], [1.0, 0.0]], stds=[0.5, 0.5]).save(root / "mixture")
    return {"sd": tiny_pipeline("text_to_image", seed=0), "sd2": tiny_pipeline("text_to_image", seed=1),
            "pixel": tiny_pipeline("pixel"), "mixture": root / "mixture"}


def _summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_and_over_two_prompts_writes_a_png_of_decoded_images(folders, tmp_path, capsys):
    out = tmp_path / "cat-and-dog.png"
    code, stdout, stderr = run(["compose", "--model", folders["sd"], "--prompt", "a cat", "--prompt", "a dog",
                                "--mode", "and", "--w", "1", "--negative-prompt", "blurry", "--out", out, *FAST],
                               capsys)
    assert code == 0, stderr[-2000:]
    assert out.read_bytes()[:4] == b"\x89PNG"
    summary = _summary(stdout)
    assert summary["prompts"] == ["a cat", "a dog"] and summary["model_calls"] == 3   # one batched call per step
    assert summary["mean_log_q"][0] == pytest.approx(summary["mean_log_q"][1], abs=1e-3)   # AND: float32 round-off


def test_npz_holds_the_latents_and_their_decoded_images(folders, tmp_path, capsys):
    out = tmp_path / "cat-or-dog.npz"
    code, _, stderr = run(["compose", "--model", folders["sd"], "--prompt", "a cat", "--prompt", "a dog",
                           "--mode", "or", "--ode", "--out", out, *FAST], capsys)
    assert code == 0, stderr[-2000:]
    saved = np.load(out)
    assert saved["x"].shape == (2, 4, 8, 8) and saved["log_q"].shape == (2, 2) and saved["kappa"].shape == (2, 2)
    assert saved["images"].shape == (2, 3, 16, 16) and 0 <= saved["images"].min() <= saved["images"].max() <= 1


def test_two_pipelines_each_with_its_own_prompt(folders, tmp_path, capsys):
    out = tmp_path / "two.png"
    code, stdout, stderr = run(["compose", "--models", folders["sd"], folders["sd2"], "--prompt", "a cat",
                                "--prompt", "a dog", "--mode", "and", "--out", out, *FAST], capsys)
    assert code == 0, stderr[-2000:]
    assert out.read_bytes()[:4] == b"\x89PNG" and _summary(stdout)["model_calls"] == 6   # one call per model per step


@pytest.mark.parametrize("args, message", [
    (["--model", "{sd}", "--prompt", "a cat"], "give at least two"),
    (["--model", "{sd}", "--prompt", "a cat", "--prompt", "a dog", "--classes", "1", "2"], "not both"),
    (["--model", "{mixture}", "--prompt", "a cat", "--prompt", "a dog"], "takes no text prompts"),
    (["--model", "{pixel}", "--prompt", "a cat", "--prompt", "a dog"], "takes no text prompts"),
    (["--models", "{pixel}", "{pixel}", "--prompt", "a cat"], "take(s) no text prompts"),
    (["--models", "{sd}", "{sd2}"], "need a prompt"),                       # finding 1: was a TypeError traceback
    (["--model", "{sd}", "--classes", "1", "2"], "compose its prompts with --prompt"),
    (["--models", "{sd}", "{sd2}", "{sd}", "--prompt", "a", "--prompt", "b"], "per model (3) or one for all"),
    (["--model", "{sd}", "--prompt", "a cat", "--prompt", "a dog", "--negative-prompt", "blurry"], "--w W"),
])
def test_mistakes_end_in_one_error_line_and_status_2(folders, tmp_path, capsys, args, message):
    out = tmp_path / "x.png"
    argv = ["compose", *[a.format(**folders) for a in args], "--out", out, *FAST]
    code, stdout, stderr = run(argv, capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and stdout == "" and "Traceback" not in stderr
    assert len(errors) == 1 and message in errors[0], stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
