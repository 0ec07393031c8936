"""`difflab distill guided | progressive` (the sub-app, via typer's CliRunner) and `sample_student`."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import difflab
from difflab.apps.cli.app import app as main_app
from difflab.apps.cli.distill import app
from difflab.core.errors import ConfigError
from difflab.data import load_digits
from difflab.distill import GuidedStudent, sample_student
from difflab.nets import UNet
from difflab.train.denoiser import DenoiserConfig, train_denoiser

runner = CliRunner()
TINY = {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "groups": 4}


def _train(tmp_path, name, classes):
    data = load_digits("train")
    torch.manual_seed(0)
    net = UNet(num_classes=10 if classes else 0, **TINY)
    config = DenoiserConfig(train_steps=2, checkpoint_every=10, device="cpu", batch_size=8, dataset="digits")
    model = train_denoiser(net, data.x, data.labels if classes else None, config, progress=False).model
    model.save(tmp_path / name)
    return tmp_path / name


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-cli")
    return root, _train(root, "teacher", True), _train(root, "uncond", False)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_guided_then_progressive_then_sample(folders):
    root, teacher, _ = folders
    result = invoke("guided", "--teacher", teacher, "--w-range", 0, 3, "--train-steps", 2, "--batch-size", 8,
                    "--out", root / "stage1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    stage1 = difflab.load(root / "stage1")
    assert isinstance(stage1, GuidedStudent) and stage1.steps is None and stage1.distilled["w_max"] == 3.0
    assert summary["stage"] == "guided"
    result = invoke("progressive", "--teacher", root / "stage1", "--from-steps", 4, "--to-steps", 1,
                    "--train-steps-per-round", 2,
                    "--batch-size", 8, "--out", root / "final", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["rounds"] == [2, 1]
    final = difflab.load(root / "final")
    assert final.steps == 1 and difflab.load(root / "final.rounds" / "steps-0002").steps == 2
    samples = sample_student(final, 3, steps=None, w=2.0, class_label=3, stochastic=True, seed=0)
    assert samples.shape == (3, 1, 8, 8) and bool(torch.isfinite(samples).all())
    # `difflab sample` spends one model evaluation per student step: --nfe is the step count it was distilled for
    two_steps = ["sample", "--model", str(root / "final.rounds" / "steps-0002"), "--w", "2", "--class", "3", "--n", "3",
                 "--device", "cpu"]
    result = runner.invoke(main_app, [*two_steps, "--nfe", "2", "--out", str(root / "two.npz")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["nfe"] == 2
    result = runner.invoke(main_app, [*two_steps, "--nfe", "4", "--out", str(root / "four.npz")])
    assert isinstance(result.exception, ConfigError) and "--nfe 2" in str(result.exception)
    # an existing output is refused without --force, before any work
    result = invoke("guided", "--teacher", teacher, "--train-steps", 1, "--out", root / "stage1", "--device", "cpu")
    assert isinstance(result.exception, ConfigError) and "--force" in str(result.exception)
    # a progressive student continues only from its own step count
    result = invoke("progressive", "--teacher", root / "final.rounds" / "steps-0002", "--from-steps", 8,
                    "--to-steps", 4, "--out", root / "again", "--device", "cpu")
    assert isinstance(result.exception, ConfigError) and "--from-steps 2" in str(result.exception)


@pytest.mark.parametrize("case, message", [
    ("uncond", "not class-conditional"),
    ("w_range", "w_min <= w_max"),
    ("progressive_from_base", "run `difflab distill guided` first"),
    ("not_power_of_two", "power of two"),
])
def test_mistakes_are_refused_before_any_work(folders, case, message):
    root, teacher, uncond = folders
    args = {"uncond": ("guided", "--teacher", uncond, "--out", root / "x1"),
            "w_range": ("guided", "--teacher", teacher, "--w-range", 3, 1, "--out", root / "x2"),
            "progressive_from_base": ("progressive", "--teacher", teacher, "--out", root / "x3"),
            "not_power_of_two": ("progressive", "--teacher", teacher, "--from-steps", 6, "--out", root / "x4")}[case]
    result = invoke(*args, "--device", "cpu")
    assert isinstance(result.exception, ConfigError), result.output
    assert message in str(result.exception)
    assert not any((root / f"x{i}").exists() for i in range(1, 5))
