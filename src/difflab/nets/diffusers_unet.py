"""A diffusers UNet behind the difflab network interface (no diffusers import here: it wraps an
already-built `UNet2DModel` / `UNet2DConditionModel`)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class DiffusersUNet(nn.Module):
    """A diffusers UNet as `model(x_vp, t, class_labels=None, encoder_hidden_states=None, ...)`.

    Exposes the mid block's output of the last call as `bottleneck` (AMED reads it). Floating conditions
    (text embeddings) are cast to x's dtype, the network's (`call_network` has cast x): a float32 prompt
    embedding drives a bf16 UNet.
    """

    time_in_float32 = True   # diffusers embeds timesteps in float32 (`call_network` keeps them so)

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet, self.bottleneck = unet, None
        if getattr(unet, "mid_block", None) is not None:
            unet.mid_block.register_forward_hook(self._keep_bottleneck)

    def _keep_bottleneck(self, module, args, output) -> None:
        self.bottleneck = output[0] if isinstance(output, tuple) else output

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        if "class_labels" in cond and cond["class_labels"] is None:
            cond.pop("class_labels")
        cond = {k: v.to(x.dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
        return self.unet(x, t, **cond, return_dict=False)[0]
