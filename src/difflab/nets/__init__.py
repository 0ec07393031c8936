"""Networks only (no diffusion maths): an MLP for vectors and a DDPM-style U-Net for images.

Both follow one interface, `net(x, c_noise, class_labels=None, extra=None) -> [B, ...]`, expose
`config` (JSON-serialisable constructor arguments: `type(net)(**net.config)` rebuilds it) and
`bottleneck` (the lowest-resolution feature of the last call).
"""

from difflab.nets.mlp import MLP
from difflab.nets.unet import UNet

NETWORKS = {"MLP": MLP, "UNet": UNet}  # the allow-list of classes a model folder may name

__all__ = ["MLP", "NETWORKS", "UNet"]
