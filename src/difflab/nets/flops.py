"""Parameters and FLOPs per forward pass, for every network (`torch.utils.flop_counter`).

FLOPs follow `FlopCounterMode`'s convention: 2 per multiply-accumulate of the matrix products
(convolutions, linear layers, matmuls, attention); element-wise work (norms, activations,
interpolation, additions, biases) is not counted. One more rule is added here: on the CPU,
`F.scaled_dot_product_attention` runs as `aten._scaled_dot_product_flash_attention_for_cpu`,
which FlopCounterMode (torch 2.13) does not know and counts as 0; it is counted below with the
same formula torch uses for the GPU kernels, so attention is included on every device.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from difflab.core.errors import ConfigError

_aten = torch.ops.aten


def attention_flops(query_shape, key_shape, value_shape) -> int:
    """FLOPs of softmax(Q Kᵀ) V: 2·B·H·L·S·E for Q Kᵀ plus 2·B·H·L·S·Ev for the product with V.

    query_shape: [B, H, L, E]; key_shape: [B, H, S, E]; value_shape: [B, H, S, Ev].
    """
    batch, heads, query_len, head_dim = query_shape
    key_len, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * query_len * key_len * (head_dim + value_dim)


def _cpu_attention_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    """Recomputed scores, then the gradients of V, of the scores, of Q and of K: 2.5× the forward
    when E = Ev (torch's count for its GPU attention backward kernels)."""
    batch, heads, query_len, head_dim = query_shape
    key_len, value_dim = key_shape[-2], value_shape[-1]
    scores = 2 * batch * heads * query_len * key_len
    return scores * (head_dim + value_dim + value_dim + head_dim + head_dim)


CPU_ATTENTION_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_forward,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts the CPU attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalars in `module`'s parameters (only those with requires_grad if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def count_flops(module: Callable[..., Tensor], *args: Any, backward: bool = False, **kwargs: Any) -> int:
    """FLOPs of one call `module(*args, **kwargs)` (2 per multiply-accumulate, see the module doc).

    With backward=True the call runs with gradients and the count includes the backward pass of
    `output.sum()` (what one training step costs, the optimiser aside).
    """
    with flop_counter() as counter:
        if backward:
            module(*args, **kwargs).sum().backward()
        else:
            with torch.no_grad():
                module(*args, **kwargs)
    return int(counter.get_total_flops())


def flops_by_operator(module: Callable[..., Tensor], *args: Any, **kwargs: Any) -> dict[str, int]:
    """Forward FLOPs of `module(*args, **kwargs)` split by aten operator (e.g. 'convolution')."""
    with flop_counter() as counter, torch.no_grad():
        module(*args, **kwargs)
    return {str(op).split(".")[-1]: int(n) for op, n in counter.get_flop_counts()["Global"].items()}


def example_inputs(net: nn.Module, batch_size: int = 1, image_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Inputs (x, c_noise) of the shape `net` expects: [B, dim] for an MLP, [B, C, S, S] for an
    image network (S = image_size, default the network's config image_size)."""
    config = getattr(net, "config", None)
    if not isinstance(config, dict):
        raise ConfigError(f"{type(net).__name__} has no `config` dict; pass inputs to count_flops instead.")
    generator = torch.Generator().manual_seed(0)
    if "dim" in config:
        shape: tuple[int, ...] = (batch_size, config["dim"])
    else:
        side = image_size or config.get("image_size", 8)
        shape = (batch_size, config["in_channels"], side, side)
    device = next(net.parameters()).device
    x = torch.randn(shape, generator=generator).to(device)
    return x, torch.zeros(batch_size, device=device)


def network_cost(net: nn.Module, batch_size: int = 1, image_size: int | None = None) -> dict[str, int]:
    """{'parameters', 'flops'}: the parameter count and the FLOPs of one forward pass of `net` on a
    batch of `batch_size` inputs of its own shape (see `example_inputs`)."""
    x, c_noise = example_inputs(net, batch_size, image_size)
    return {"parameters": count_parameters(net), "flops": count_flops(net, x, c_noise)}


__all__ = ["attention_flops", "count_flops", "count_parameters", "example_inputs", "flop_counter",
           "flops_by_operator", "network_cost"]
