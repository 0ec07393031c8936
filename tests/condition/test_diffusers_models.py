"""DEFT, DPS and ΠGDM on a user's pixel diffusers model (issue 16, finding 9): a tiny random DDPMPipeline
(`unet/ scheduler/`, images [3, 8, 8]) loaded as a VPDenoiser whose σ range is its ᾱ table's, about
[0.0100, 157.4]. Every σ that fitting draws and every grid a reconstruction uses stays inside it; a range
asked for outside it is refused, naming both ranges, before any work."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import difflab
from difflab.condition import DEFTConfig, HNetwork, fit_deft, load_hnet
from difflab.condition.reconstruct import make_denoiser, make_operator, reconstruct, simulate
from difflab.core.errors import SigmaRangeError
from difflab.core.fingerprint import fingerprint
from tests.apps.cli.helpers import run as run_cli

pytest.importorskip("diffusers")

SHAPE = (3, 8, 8)
# a fitting range wider than the table on both sides: ln σ ~ N(0, 3²) puts ≈6% of the draws below 0.01 and
# ≈5% above 157, so 4 steps of 16 draw beyond both ends unless they are kept in range
WIDE = {"p_mean": 0.0, "p_std": 3.0}
TINY_FIT = {"train_steps": 4, "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 1000, "seed": 0, "device": "cpu"}


class SigmaLog:
    """A forward pre-hook on the model recording every σ it is called with (the wrapped model keeps its
    fingerprint: the hook is no part of its config or weights)."""

    def __init__(self, model):
        self.sigmas: list[torch.Tensor] = []
        self.handle = model.register_forward_pre_hook(lambda module, args: self.sigmas.append(args[1].detach()))

    def take(self) -> torch.Tensor:
        """Every σ recorded since the last take, flattened: [n]."""
        sigmas, self.sigmas = self.sigmas, []
        return torch.cat([s.double().flatten() for s in sigmas]) if sigmas else torch.zeros(0, dtype=torch.float64)


def in_table(model, sigmas: torch.Tensor) -> bool:
    # 1e-6 relative: the float32 round-off of the table's end points, far below the table's first step (≈2%)
    return bool((sigmas >= model.sigma_min * (1 - 1e-6)).all() and (sigmas <= model.sigma_max * (1 + 1e-6)).all())


def clean_images(n: int = 32) -> torch.Tensor:
    """n smooth colour images in [−1, 1]: [n, 3, 8, 8]."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 3, 2, 2, generator=generator) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=8, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def pixel(tiny_pipeline):
    """(folder, model, sigma log) of the tiny pixel DDPM pipeline, built once."""
    folder = tiny_pipeline("pixel")
    model = difflab.load(folder)
    assert tuple(model.data_shape) == SHAPE and 0.009 < model.sigma_min < 0.011
    return folder, model, SigmaLog(model)


@pytest.fixture(scope="module")
def fitted(pixel):
    """(h-network, every σ the fit called the model with) for a box inpainting operator."""
    folder, model, log = pixel
    log.take()
    result = fit_deft(model, make_operator("inpaint", SHAPE), clean_images(), DEFTConfig(**TINY_FIT, **WIDE))
    return result.model, log.take()


def test_fit_deft_draws_every_sigma_inside_the_ddpm_table(pixel, fitted):
    """Finding 9: this failed before (SigmaRangeError from the model's table mid-fit, σ ≈ 0.0035 < 0.0100,
    with a message about grids): DEFT drew ln σ ~ N(p_mean, p_std²) without regard to the model's range."""
    _, model, _ = pixel
    hnet, sigmas = fitted
    assert len(sigmas) >= 4 * 16 and in_table(model, sigmas)
    # truncated, not narrowed: the draws still span most of the table's 4.2 decades (N(0, 3²) in ln σ)
    assert float(sigmas.min()) < 0.05 and float(sigmas.max()) > 30


def test_hnetwork_reads_three_channel_images_and_is_bound_to_the_model_fingerprint(pixel, fitted, tmp_path):
    folder, model, _ = pixel
    hnet, _ = fitted
    assert hnet.data_shape == SHAPE and hnet.nn1.config["in_channels"] == 3 * hnet.inputs
    assert hnet.base_model == fingerprint(model)
    hnet.save(tmp_path / "h")
    assert isinstance(difflab.load(tmp_path / "h"), HNetwork)
    reloaded = load_hnet(tmp_path / "h", base=difflab.load(folder))     # a fresh load of the same folder
    x, sigma = torch.randn(2, *SHAPE), torch.full((2,), 0.5)
    x0_hat, g = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    operator = make_operator("inpaint", SHAPE)
    with torch.no_grad():
        assert torch.equal(reloaded(x, sigma, x0_hat, g, operator, x0_hat), hnet(x, sigma, x0_hat, g, operator, x0_hat))


@pytest.mark.parametrize("method", ["dps", "pigdm", "deft"])
def test_reconstructions_run_inside_the_table_on_inpainting(pixel, fitted, method):
    _, model, log = pixel
    hnet, _ = fitted
    operator, y = simulate(make_operator("inpaint", SHAPE), clean_images(3), seed=1)
    denoiser = make_denoiser(method, model, operator, hnet)
    log.take()
    x = reconstruct(denoiser, y, [0, 1, 2], SHAPE, "heun", nfe=5)
    sigmas = log.take()
    assert x.shape == (3, *SHAPE) and bool(torch.isfinite(x).all())
    assert len(sigmas) > 0 and in_table(model, sigmas)


def test_a_range_outside_the_table_is_refused_before_any_work(pixel):
    _, model, log = pixel
    operator = make_operator("inpaint", SHAPE)
    log.take()
    for asked in ({"sigma_min": 0.001}, {"sigma_max": 1000.0}):
        with pytest.raises(SigmaRangeError) as fit_error:
            fit_deft(model, operator, clean_images(), DEFTConfig(**TINY_FIT, **asked))
        operator_b, y = simulate(operator, clean_images(2))
        with pytest.raises(SigmaRangeError) as run_error:
            reconstruct(make_denoiser("dps", model, operator_b), y, [0, 1], SHAPE, "heun", nfe=5, **asked)
        for error in (fit_error, run_error):
            message = str(error.value)
            assert "\n" not in message and "[0.01, 157.4]" in message, message      # the model's range
            assert f"{next(iter(asked.values())):.4g}" in message, message          # and the one asked for
    assert len(log.take()) == 0


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A folder of 32 RGB 8×8 PNGs (the tiny pipeline names no data set: `--data` gives one)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("rgb")
    pixels = ((clean_images() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, image in enumerate(pixels):
        Image.fromarray(image, mode="RGB").save(root / f"{i:02d}.png")
    return root


def test_cli_condition_fit_then_run_on_the_diffusers_folder(pixel, image_folder, tmp_path, capsys):
    folder = pixel[0]
    code, out, err = run_cli(["condition", "fit", "--model", folder, "--task", "inpaint", "--data", image_folder,
                              "--pairs", 32, "--train-steps", 3, "--batch-size", 16, "--out", tmp_path / "h",
                              "--device", "cpu"], capsys)
    assert code == 0, err
    operator, y = simulate(make_operator("inpaint", SHAPE), clean_images(2))
    np.savez(tmp_path / "y.npz", y=y.numpy())
    for method in ("deft", "dps", "pigdm"):
        chosen = ["--hnet", tmp_path / "h"] if method == "deft" else ["--task", "inpaint"]
        code, out, err = run_cli(["condition", "run", "--model", folder, "--method", method, *chosen, "--input",
                                  tmp_path / "y.npz", "--nfe", 5, "--out", tmp_path / f"{method}.npz",
                                  "--device", "cpu"], capsys)
        assert code == 0, err
        x = np.load(tmp_path / f"{method}.npz")["x"]
        assert x.shape == (2, *SHAPE) and np.isfinite(x).all() and json.loads(out)["method"] == method


def test_cli_refuses_a_range_outside_the_table_in_one_line(pixel, image_folder, tmp_path, capsys):
    folder = pixel[0]
    np.savez(tmp_path / "y.npz", y=torch.zeros(2, *SHAPE).numpy())
    commands = [["condition", "fit", "--model", folder, "--task", "inpaint", "--data", image_folder, "--pairs", 32,
                 "--train-steps", 3, "--sigma-min", 0.001, "--out", tmp_path / "h"],
                ["condition", "run", "--model", folder, "--method", "dps", "--task", "inpaint", "--input",
                 tmp_path / "y.npz", "--nfe", 5, "--sigma-max", 1000, "--out", tmp_path / "x.npz"]]
    for argv in commands:
        code, out, err = run_cli([*argv, "--device", "cpu"], capsys)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "[0.01, 157.4]" in err, err
    assert not (tmp_path / "h").exists() and not (tmp_path / "x.npz").exists()
