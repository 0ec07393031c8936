"""Reconstruction end to end: build an operator for a task, simulate measurements, run DEFT / DPS /
ΠGDM / the unconditional floor with any solver at an exact NFE, and score the results (PSNR, SSIM).

Shared by the CLI (`difflab condition`), the demo section and benchmarks/deft.py, so they agree.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from difflab.condition.deft import DEFTDenoiser, HNetwork
from difflab.condition.guidance import DPS, PiGDM
from difflab.condition.operators import HDR, Blur, Inpaint, Operator, PhaseRetrieval, Radon, SuperResolution
from difflab.core.errors import ConfigError, UnknownNameError
from difflab.metrics.images import psnr, ssim  # noqa: F401  (re-exported: reconstruct's API)
from difflab.sampling import sample, seeded_noise, sigmas_for_nfe
from difflab.sampling.grids import EDM_RANGE, model_sigma_range

TASKS = ("inpaint", "superres", "blur", "hdr", "phase", "ct")
METHODS = ("deft", "dps", "pigdm", "uncond")
DPS_ZETA, PIGDM_WEIGHT = 0.3, 1.0   # the documented defaults (guidance.py)


def make_operator(task: str, shape: Sequence[int], sigma_y: float = 0.05, mask: str = "box", fraction: float = 0.5,
                  factor: int = 2, kernel_size: int = 5, kernel_std: float = 1.0, angles: int = 16,
                  oversample: int = 2) -> Operator:
    """The operator of a task for per-sample `shape`, from the CLI's task options."""
    if task == "inpaint":
        return Inpaint(sigma_y=sigma_y, kind="coords" if len(shape) == 1 and mask == "box" else mask,
                       fraction=fraction, shape=shape)
    if task == "superres":
        return SuperResolution(factor, sigma_y)
    if task == "blur":
        return Blur(kernel_size, kernel_std, sigma_y)
    if task == "hdr":
        return HDR(sigma_y)
    if task == "phase":
        return PhaseRetrieval(oversample, sigma_y)
    if task == "ct":
        return Radon(angles, sigma_y)
    raise UnknownNameError(f"unknown task {task!r}; choose one of {TASKS}")


def simulate(operator: Operator, x0: Tensor, seed: int = 0) -> tuple[Operator, Tensor]:
    """(operator with this batch's masks, y = A(x0) + σ_y n), reproducible from `seed`."""
    generator = torch.Generator(x0.device).manual_seed(seed)
    operator = operator.resample(len(x0), generator)
    return operator, operator.measure(x0, generator)


def make_denoiser(method: str, base: nn.Module, operator: Operator, hnet: HNetwork | None = None,
                  zeta: float = DPS_ZETA, weight: float = PIGDM_WEIGHT) -> nn.Module:
    """The conditional denoiser of a method: DEFT (needs `hnet`), DPS, ΠGDM or the base itself ("uncond")."""
    if method == "deft":
        if hnet is None:
            raise ConfigError("method 'deft' needs a fitted h-network "
                              "(--hnet DIR; fit one with `difflab condition fit`)")
        return DEFTDenoiser(base, hnet, operator)
    if method == "dps":
        return DPS(base, operator, zeta)
    if method == "pigdm":
        return PiGDM(base, operator, weight)
    if method == "uncond":
        return base
    raise UnknownNameError(f"unknown method {method!r}; choose one of {METHODS}")


def reconstruct(denoiser: nn.Module, y: Tensor, seeds: Sequence[int], shape: Sequence[int], solver: str = "heun",
                nfe: int = 19, conditional: bool = True, sigma_min: float | None = None,
                sigma_max: float | None = None) -> Tensor:
    """Posterior samples [len(seeds), *shape]: `solver` at exactly `nfe` evaluations on the Karras grid
    from sigma_max to sigma_min then σ = 0, from per-sample seeded noise (sample i depends only on seeds[i]).

    sigma_min / sigma_max: None takes the denoiser's declared end, clipped to EDM's [0.002, 80] (a diffusers
    DDPM table: [0.01, 80]); a range leaving the denoiser's is refused (SigmaRangeError) before sampling."""
    sigma_min, sigma_max = model_sigma_range(denoiser, sigma_min, sigma_max, default=EDM_RANGE)
    sigmas = sigmas_for_nfe(solver, nfe, "karras", sigma_min, sigma_max, to_zero=True)
    device = y.device
    x = seeded_noise(seeds, shape, float(sigmas[0]), device=device)
    cond = {"y": y} if conditional else {}
    with torch.no_grad():
        return sample(denoiser, x, sigmas, solver, **cond)


def summarise(values: Tensor) -> dict[str, float]:
    """Mean and standard error of per-sample values."""
    values = values.double()
    sem = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return {"mean": round(float(values.mean()), 4), "sem": round(sem, 4)}


__all__ = ["TASKS", "METHODS", "make_operator", "simulate", "make_denoiser", "reconstruct", "psnr", "ssim",
           "summarise"]
