"""`difflab demo --data mnist --quick` end to end on a synthetic 28×28 stand-in: no MNIST files are read,
and every section's sizes are shrunk (tiny networks, a few steps) so the whole report takes seconds."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import difflab.data
from difflab import EDMDenoiser
from difflab.apps.demo import condition, cunet, datasets, distill, run, sampling
from difflab.apps.demo.run import SECTIONS, run_demo
from difflab.core.errors import ConfigError
from difflab.data import Dataset
from difflab.nets import UNet

TINY_UNET = {"base_channels": 4, "channel_mults": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "groups": 2,
             "image_size": 28}
TINY_CUNET = {"base_channels": 4, "channel_mults": [1, 2], "attn_resolutions": [], "groups": 2, "embed_dim": 32,
              "image_size": 28}


def synthetic_mnist(split: str) -> Dataset:
    """A stand-in with MNIST's format: x [N, 1, 28, 28] in [-1, 1], labels [N] in 0..9; class c is a bright
    4×4 square at a class-dependent place (so the classifier can tell them apart) plus noise."""
    n = {"train": 240, "test": 40}[split]
    generator = torch.Generator().manual_seed(0 if split == "train" else 1)
    labels = torch.arange(n) % 10
    x = -1 + 0.2 * torch.rand(n, 1, 28, 28, generator=generator)
    for i, label in enumerate(labels.tolist()):
        row, col = 2 + 6 * (label // 4), 2 + 6 * (label % 4)
        x[i, 0, row:row + 4, col:col + 4] = 1.0
    return Dataset(x, labels, "mnist", 10)


@pytest.fixture
def tiny_mnist_demo(monkeypatch, tmp_path):
    """The demo's MNIST path with the stand-in data, its own classifier cache and every size shrunk."""
    monkeypatch.setitem(difflab.data.IMAGE_DATASETS, "mnist", synthetic_mnist)
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))   # never touch the real MNIST classifier
    tiny = dataclasses.replace(datasets.MNIST, unet=TINY_UNET, cunet=TINY_CUNET, train_steps=(3, 4), batch_size=16,
                               n_samples=(20, 24))
    monkeypatch.setitem(datasets.IMAGE_DATA, "mnist", tiny)
    # the 2-D base section does not depend on --data (test_demo.py runs it): a stub keeps this test short
    monkeypatch.setattr(run, "gmm_section", lambda out, quick, seed, device: {"figures": []})
    monkeypatch.setitem(sampling.SIZES, True, {"n": 8, "amed_nfes": (5,), "trajectories": 8, "heldout": 8})
    monkeypatch.setitem(sampling.REF_POINTS, True, 11)
    monkeypatch.setitem(condition.SIZES, True, (4, 3, 8, 5))
    monkeypatch.setitem(distill.RECIPES, True, {"unet": {**TINY_UNET, "channel_mults": [1]}, "teacher_steps": 3,
                                                "batch": 16, "guided_steps": 2, "n0": 8, "round_steps": 2,
                                                "n_per_class": 2})
    monkeypatch.setitem(cunet.SIZES, True, {"forward_batch": 4, "repeats": 1, "train_steps": 3})
    return tmp_path / "demo"


def test_mnist_demo_runs_every_section_on_28x28_images_and_says_so(tiny_mnist_demo):
    summary = run_demo(tiny_mnist_demo, quick=True, seed=0, device="cpu", data="mnist")
    report = json.loads((tiny_mnist_demo / "report.json").read_text())
    assert report["dataset"] == summary["dataset"] == "mnist"
    sections = report["sections"]
    assert list(sections) == ["gmm", "mnist", *[key for key, *_ in SECTIONS]]
    base = sections["mnist"]
    assert base["train_steps"] == 3 and base["n_samples"] == 20     # the quick sizes
    assert math.isfinite(base["frechet"]) and base["frechet_floor"] > 0
    config = json.loads((tiny_mnist_demo / "models" / "mnist-3" / "config.json").read_text())
    assert config["data_shape"] == [1, 28, 28] and config["dataset"] == "mnist"
    for key, section in sections.items():
        for name in section.get("figures", []):
            assert (tiny_mnist_demo / name).stat().st_size > 1000, (key, name)
    assert sections["distill"]["frechet_floor"] > 0
    assert "unet (demo mnist model)" in sections["cunet"]["psnr_db"]
    html = (tiny_mnist_demo / "report.html").read_text()
    assert "data set mnist" in html and "<h2>Base model: MNIST</h2>" in html


def test_mnist_demo_refuses_a_base_model_of_other_images_before_any_section(tmp_path):
    folder = tmp_path / "digits-model"
    EDMDenoiser(UNet(**TINY_UNET), sigma_data=0.5, data_shape=(1, 8, 8)).save(folder)
    with pytest.raises(ConfigError, match=r"shape \[1, 8, 8\].*'mnist' has \[1, 28, 28\]"):
        run_demo(tmp_path / "demo", quick=True, data="mnist", model=folder)
    assert not (tmp_path / "demo").exists()
