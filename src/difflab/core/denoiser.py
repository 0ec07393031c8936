"""The denoiser contract: `D(x, sigma, **cond) -> x0_hat` in σ-space (x_σ = x0 + σ·ε).

Everything in difflab — solvers, composition, guidance, distillation targets — is written
against this one callable. `eps` and `score` are the only places the conversions
ε̂ = (x − D)/σ and s = (D − x)/σ² are written.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from difflab.core.errors import ShapeError


@runtime_checkable
class Denoiser(Protocol):
    """Any callable mapping a noisy batch to its denoised estimate.

    x: [B, ...]; sigma: [B] float, same device as x. Returns x0_hat: [B, ...] like x.
    A denoiser may expose `last_feature` (the wrapped network's lowest-resolution feature of
    its last call, or None) and `sigma_min` / `sigma_max` (the range it was trained on).
    """

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor: ...


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """[B] -> [B, 1, ..., 1] with `ndim` dimensions in all, for broadcasting against x."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def sigma_batch(sigma: Tensor | float, x: Tensor) -> Tensor:
    """A scalar or [B] noise level as a [B] tensor on x's device and dtype."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ShapeError(f"sigma must be a scalar or of shape [B]=[{x.shape[0]}], got {tuple(sigma.shape)}")
    return sigma


def eps(denoiser: Denoiser, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
    """ε̂(x; σ) = (x − D(x; σ))/σ, the probability-flow ODE's dx/dσ. sigma > 0."""
    sigma = sigma_batch(sigma, x)
    return (x - denoiser(x, sigma, **cond)) / append_dims(sigma, x.ndim)


def score(denoiser: Denoiser, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
    """s(x; σ) = ∇ log p_σ(x) = (D(x; σ) − x)/σ² (Tweedie's formula). sigma > 0."""
    sigma = sigma_batch(sigma, x)
    return (denoiser(x, sigma, **cond) - x) / append_dims(sigma, x.ndim) ** 2


def call_network(net: Any, x: Tensor, time: Tensor, **cond: Any) -> Tensor:
    """net(x, time, **cond) in the network's own floating dtype, the result back in x's dtype.

    The solver state may be float32 or float64 while the network holds bf16 / fp16 / float32
    weights: the wrapper converts at this one boundary, so no solver knows the network's precision.
    A network whose `time_in_float32` is true gets `time` in float32 whatever its weights (diffusers'
    UNets embed the timestep in float32: a bf16 timestep near 999 would round to a multiple of 4).
    A plain function (no parameters) is called as it is.
    """
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), None) \
        if hasattr(net, "parameters") else None
    if dtype is None or dtype == x.dtype:
        return net(x, time, **cond)
    time_dtype = torch.float32 if getattr(net, "time_in_float32", False) else dtype
    return net(x.to(dtype), time.to(time_dtype), **cond).to(x.dtype)


def last_feature(denoiser: Any) -> Tensor | None:
    """The lowest-resolution feature a wrapped network exposed on its last call, if any."""
    return getattr(denoiser, "last_feature", None)
