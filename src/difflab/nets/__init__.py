"""Networks only (no diffusion maths): an MLP for vectors, a DDPM-style U-Net and the cU-Net (a
U-Net of ODE blocks) for images; `flops` counts parameters and FLOPs of any of them.

All follow one interface, `net(x, c_noise, class_labels=None, extra=None) -> [B, ...]`, expose
`config` (JSON-serialisable constructor arguments: `type(net)(**net.config)` rebuilds it) and
`bottleneck` (the lowest-resolution feature of the last call).
"""

from difflab.nets.cunet import CUNet
from difflab.nets.mlp import MLP
from difflab.nets.unet import UNet

NETWORKS = {"MLP": MLP, "UNet": UNet, "CUNet": CUNet}  # the allow-list of classes a model folder may name

__all__ = ["CUNet", "MLP", "NETWORKS", "UNet"]
