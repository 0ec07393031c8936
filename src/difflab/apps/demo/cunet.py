"""The cU-Net against the U-Net on the demo's image data set: costs, forward time, one-step denoising PSNR.

Shared by `difflab demo` (`demo_section`) and benchmarks/nets.py (the full comparison).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from difflab.apps.demo.datasets import image_base
from difflab.core.denoiser import sigma_batch
from difflab.metrics.images import psnr
from difflab.nets.cunet import CUNet
from difflab.nets.flops import count_flops, count_parameters, example_inputs
from difflab.sampling.noise import seeded_noise

PSNR_SIGMAS = (0.1, 0.2, 0.5)
PSNR_IMAGES = 300   # held-out images scored (the digits' test split has 297: all of them)
# quick / full: forward-timing batch and repeats, cU-Net training steps (its batch: 64 quick, else the base's)
SIZES = {True: {"forward_batch": 64, "repeats": 2, "train_steps": 30},
         False: {"forward_batch": 256, "repeats": 5, "train_steps": 300}}


@torch.no_grad()
def one_step_psnr(denoiser: nn.Module, x0: Tensor, sigmas: Sequence[float] = PSNR_SIGMAS, seed: int = 0,
                  **cond) -> dict[str, float]:
    """PSNR of one denoiser call D(x0 + σε; σ) against x0, per σ (no search along a trajectory).

    x0: [N, ...] clean images; ε for image i is drawn from seed `seed + i`, the same for every σ.
    Returns {"sigma=0.1": dB, ...}.
    """
    noise = seeded_noise(range(seed, seed + len(x0)), x0.shape[1:], 1.0, device=x0.device)
    return {f"sigma={sigma:g}": float(psnr(denoiser(x0 + sigma * noise, sigma_batch(sigma, x0), **cond), x0).mean())
            for sigma in sigmas}


@torch.no_grad()
def forward_seconds(nets: dict[str, nn.Module], batch_size: int = 256, repeats: int = 5,
                    image_size: int | None = None) -> dict[str, float]:
    """Median wall time of one forward pass per network, at `batch_size`; the networks take turns
    (one warm-up call each, then `repeats` interleaved rounds) so a drifting machine load hits
    them alike."""
    inputs = {name: example_inputs(net, batch_size, image_size) for name, net in nets.items()}
    times: dict[str, list[float]] = {name: [] for name in nets}
    for round_index in range(repeats + 1):
        for name, net in nets.items():
            start = time.perf_counter()
            net(*inputs[name])
            if round_index:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def cost_table(nets: dict[str, nn.Module], reference: str, image_size: int | None = None) -> dict[str, dict]:
    """Per network: parameters, FLOPs per forward of one image, and both as fractions of `reference`."""
    rows = {}
    for name, net in nets.items():
        rows[name] = {"parameters": count_parameters(net),
                      "flops_per_forward": count_flops(net, *example_inputs(net, 1, image_size))}
    for row in rows.values():
        row["parameters_ratio"] = round(row["parameters"] / rows[reference]["parameters"], 4)
        row["flops_ratio"] = round(row["flops_per_forward"] / rows[reference]["flops_per_forward"], 4)
    return rows


def demo_section(out: Path, quick: bool, seed: int, device: str, base: dict) -> dict:
    """cU-Net vs U-Net on the demo's image data set (datasets.image_base: the digits by default; the
    data set's base U-Net config against its cU-Net config): parameters, FLOPs, forward-time ratio and,
    when `base` holds the demo's trained base U-Net (base[NAME], an EDMDenoiser, e.g. base["digits"]),
    one-step denoising PSNR of a briefly trained cU-Net next to it. JSON-serialisable."""
    from difflab.apps.demo.run import cached_model
    from difflab.nets import UNet
    from difflab.train.denoiser import DenoiserConfig, train_denoiser

    data, base_unet = image_base(base)
    sizes = SIZES[bool(quick)]
    torch.manual_seed(seed)
    nets = {"unet": UNet(**data.unet).to(device).eval(), "cunet": CUNet(**data.cunet).to(device).eval()}
    section: dict = {"cunet_config": nets["cunet"].config, "costs": cost_table(nets, "unet")}
    forward_batch = sizes["forward_batch"]
    seconds = forward_seconds(nets, forward_batch, repeats=sizes["repeats"])
    section["forward_seconds"] = {"batch_size": forward_batch, **{k: round(v, 4) for k, v in seconds.items()},
                                  "cunet_over_unet": round(seconds["cunet"] / seconds["unet"], 3)}
    if base_unet is not None:
        steps, batch_size = sizes["train_steps"], 64 if quick else data.batch_size
        train_x = data.load("train").x

        def train():
            config = DenoiserConfig(train_steps=steps, lr=2e-3, seed=seed, device=device, checkpoint_every=steps,
                                    batch_size=batch_size, dataset=data.name)
            return train_denoiser(CUNet(**data.cunet), train_x, config=config, progress=not quick).model

        cunet, train_seconds = cached_model(Path(out) / "models" / f"{data.name}-cunet-{steps}x{batch_size}", train)
        test_x = data.load("test").x[:PSNR_IMAGES].to(device)
        psnr_db = {f"unet (demo {data.name} model)": one_step_psnr(base_unet.to(device), test_x, seed=seed),
                   f"cunet ({steps} steps, batch {batch_size})": one_step_psnr(cunet.to(device), test_x, seed=seed)}
        section["psnr_db"] = {name: {k: round(v, 2) for k, v in row.items()} for name, row in psnr_db.items()}
        section["cunet_train_steps"], section["cunet_train_seconds"] = steps, round(train_seconds, 1)
    return section


__all__ = ["PSNR_SIGMAS", "cost_table", "demo_section", "forward_seconds", "one_step_psnr"]
