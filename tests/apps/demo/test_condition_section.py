"""The demo's inverse-problems section (quick mode) on a tiny untrained digits model (slow: ~30 s)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difflab import EDMDenoiser
from difflab.apps.demo.condition import demo_section
from difflab.nets import UNet


@pytest.mark.slow
def test_demo_section_quick_writes_a_figure_and_json_metrics(tmp_path):
    torch.manual_seed(0)
    net = UNet(base_channels=8, channel_mults=[1], attn_resolutions=[], groups=4, zero_init_output=False)
    base = EDMDenoiser(net, sigma_data=0.75, data_shape=(1, 8, 8), meta={"dataset": "digits"})
    base.save(tmp_path / "digits")
    result = demo_section(tmp_path / "out", quick=True, seed=0, device="cpu",
                          base={"digits": base, "digits_dir": tmp_path / "digits"})
    json.dumps(result)   # JSON-serialisable
    assert result["figures"] == ["condition_inpaint.png"] and (tmp_path / "out" / "condition_inpaint.png").is_file()
    methods = result["tasks"]["inpaint"]["methods"]
    assert set(methods) == {"deft", "dps", "pigdm", "uncond"}
    assert all(row["psnr"]["mean"] > 0 and row["seconds_per_image"] > 0 for row in methods.values())
    # the fitted h-network is cached and reused on a second run (no refit)
    again = demo_section(tmp_path / "out", quick=True, seed=0, device="cpu",
                         base={"digits": base, "digits_dir": tmp_path / "digits"})
    assert again["tasks"]["inpaint"]["fit_seconds"] == 0.0


WHITE = {k: torch.ones(2, 1, 8, 8) for k in ("measurement", "DEFT", "truth")}   # only text and frames are dark


def _dark(image) -> np.ndarray:
    return np.asarray(image.convert("L")) < 128


def _text_rows_above_the_images(image) -> int:
    """Pixel rows with dark text above the first axes frame (a dark line across most of the width)."""
    dark = _dark(image)
    frame_top = int(np.argmax(dark.mean(axis=1) > 0.5))
    return int(dark[:frame_top].any(axis=1).sum())


def _text_columns_left_of_the_images(image) -> int:
    """Pixel columns with dark text left of the first axes frame (a dark line down most of the height)."""
    dark = _dark(image)
    frame_left = int(np.argmax(dark.mean(axis=0) > 0.5))
    return int(dark[:, :frame_left].any(axis=0).sum())


def test_comparison_row_labels_are_written_left_of_the_rows_and_must_match_them(tmp_path):
    from PIL import Image

    from difflab.apps.demo.condition import save_comparison

    plain = Image.open(save_comparison(WHITE, tmp_path / "plain.png", "a title"))
    labelled = Image.open(save_comparison(WHITE, tmp_path / "labelled.png", "a title",
                                          row_labels=["inpaint_box", "superres4"]))
    assert labelled.height == plain.height and labelled.width > plain.width     # a margin for the labels
    assert _text_columns_left_of_the_images(plain) == 0 < _text_columns_left_of_the_images(labelled)
    with pytest.raises(ValueError, match="3 row labels for 2 rows"):
        save_comparison(WHITE, tmp_path / "bad.png", row_labels=["a", "b", "c"])
    assert not (tmp_path / "bad.png").exists()


def test_a_long_comparison_title_wraps_inside_the_figure(tmp_path):
    from PIL import Image

    from difflab.apps.demo.condition import save_comparison

    short = Image.open(save_comparison(WHITE, tmp_path / "short.png", "Heun, 19 NFE"))
    long = Image.open(save_comparison(WHITE, tmp_path / "long.png", "rows: " + ", ".join(["inpaint_box"] * 8)))
    assert long.width == short.width                       # the figure keeps its width: the title wraps, so
    assert _text_rows_above_the_images(long) > 1.5 * _text_rows_above_the_images(short)   # it takes more lines
