"""A diffusers UNet behind the difflab network interface (no diffusers import here: it wraps an
already-built `UNet2DModel` / `UNet2DConditionModel`)."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class DiffusersUNet(nn.Module):
    """A diffusers UNet as `model(x_vp, t, class_labels=None, encoder_hidden_states=None, ...)`.

    Exposes the mid block's output of the last call as `bottleneck` (AMED reads it).
    """

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
        return self.unet(x, t, **cond, return_dict=False)[0]
