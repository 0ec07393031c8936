"""The demo's inverse-problems section (quick mode) on a tiny untrained digits model (slow: ~30 s)."""
from __future__ import annotations

import json

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
