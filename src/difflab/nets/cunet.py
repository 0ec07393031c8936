"""The cU-Net: a U-Net whose stages are ODE blocks (Calvo-Ordonez et al., "Beyond U", 2310.20092).

Each stage integrates dh/ds = f_θ(h; temb) over s ∈ [0, 1] with a fixed-step integrator
(nets/ode.py; one classical RK4 step by default: 4 evaluations of f, weights reused), so depth
comes from integration rather than from more parameters.

    stem      conv3×3 (C → C0/2) → SiLU → conv1×1 (→ C0)
    encoder   per level i < L−1: ODE block (C_i) [→ attention] → skip;  conv1×1 (→ C_{i+1}), ×½
    middle    ODE block (C_{L−1}) [→ attention]                      (the `bottleneck` feature)
    decoder   per level i < L−1, deepest first: ×2, concat skip, conv1×1 (→ C_i),
              ODE block (C_i) [→ attention]
    output    GroupNorm → SiLU → conv1×1 (→ C_out), zero-initialised

with C_i = base_channels · channel_mults[i]; attention (residual) at the feature-map sizes in
`attn_resolutions`; ×½ is bilinear downsampling of an even-sized map (identical to 2×2 average
pooling, which is how it is computed), ×2 bilinear upsampling.

The public code's defects, fixed here: the noise level reaches every ODE function (scale-shift of
its second normalisation by the conditioning embedding); attention is residual; any input size
works (zero-padded up to a multiple of 2^(L−1) and cropped back). The ODE is first order,
dh/ds = f(h); see docs/cunet.md for why not a second-order one.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from difflab.core.errors import ConfigError
from difflab.nets.embeddings import ConditionEmbedding
from difflab.nets.ode import ODESolver, integrate
from difflab.nets.unet import SelfAttention, check_images, group_norm, level_has_attention, pad_to_levels, zero_init


class ODEFunc(nn.Module):
    """f_θ(h; scale, shift) = conv3×3(SiLU(GN(SiLU(conv3×3(GN(h))))·(1 + scale) + shift)).

    The paper's f (norm → conv → act → norm → scale-shift → conv → act) with the last activation
    moved before the last conv: f's output is then unbounded (a final SiLU would confine every
    dh/ds ≥ −0.28), and the last conv starts at zero so each ODE block starts as the identity.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm_in = group_norm(channels, groups)
        self.conv_in = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm_mid = group_norm(channels, groups)
        self.conv_out = zero_init(nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, h: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """h: [B, C, H, W]; scale, shift: [B, C, 1, 1] -> dh/ds [B, C, H, W]."""
        hidden = F.silu(self.conv_in(self.norm_in(h)))
        hidden = self.norm_mid(hidden) * (1 + scale) + shift  # the noise level enters here
        return self.conv_out(F.silu(hidden))


class ODEBlock(nn.Module):
    """h ↦ h(1), dh/ds = f_θ(h; temb), h(0) = h (first-order ODE over s ∈ [0, 1])."""

    def __init__(self, channels: int, embed_dim: int, groups: int, solver: ODESolver):
        super().__init__()
        self.func = ODEFunc(channels, groups)
        self.embed_proj = nn.Linear(embed_dim, 2 * channels)  # -> (scale, shift), fixed along s
        self.solver = solver

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """h: [B, C, H, W], emb: [B, E] -> [B, C, H, W]."""
        scale, shift = self.embed_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)

        def dynamics(s: Tensor, state: Tensor) -> Tensor:  # autonomous: f does not read s
            return self.func(state, scale, shift)

        return integrate(dynamics, h, self.solver, adjoint_params=(*self.func.parameters(), scale, shift))


class ODEStage(nn.Module):
    """An ODE block, followed by residual self-attention when `attention` is True."""

    def __init__(self, channels: int, embed_dim: int, groups: int, solver: ODESolver, attention: bool):
        super().__init__()
        self.ode = ODEBlock(channels, embed_dim, groups, solver)
        self.attn = SelfAttention(channels, groups) if attention else nn.Identity()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.ode(h, emb))


class CUNet(nn.Module):
    """cU-Net: net(x [B, C, H, W], c_noise [B], class_labels, extra) -> [B, C_out, H, W].

    Args:
        in_channels, out_channels: channels of x and of the output (None: in_channels).
        base_channels: level i has base_channels · channel_mults[i] channels; also the number
            of sinusoidal features of c_noise (and extra).
        channel_mults: one multiplier per resolution level; the last level is the middle.
        attn_resolutions: feature-map sizes (side lengths, counted from `image_size`) at which
            residual self-attention follows the ODE block.
        num_classes: 0 for an unconditional net; else labels 0..num_classes-1, negative = null.
        extra_embed: accept a spare scalar `extra` [B] whose embedding starts at exactly zero.
        groups: GroupNorm groups; must divide every level's channel count.
        embed_dim: width of the conditioning embedding every ODE block reads its scale-shift from.
        zero_init_output: the output conv starts at zero, so the initial output is exactly 0.
        image_size: the nominal input side, used only to place attention; any size works.
        ode_method, ode_steps, ode_backend, ode_rtol, ode_atol, ode_adjoint: the integrator of
            every ODE block (nets/ode.py ODESolver); default one classical RK4 step.

    After each call `self.bottleneck` holds the middle stage's output [B, C_{L−1}, h, w]
    (h = ceil(H / 2^(L−1)), w likewise; not detached).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 16,
        channel_mults: Sequence[int] = (1, 2, 4),
        attn_resolutions: Sequence[int] = (4, 2),
        num_classes: int = 0,
        extra_embed: bool = False,
        groups: int = 4,
        embed_dim: int = 128,
        zero_init_output: bool = True,
        image_size: int = 8,
        ode_method: str = "rk4",
        ode_steps: int = 1,
        ode_backend: str = "fixed",
        ode_rtol: float = 1e-3,
        ode_atol: float = 1e-4,
        ode_adjoint: bool = False,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.config = {
            "in_channels": int(in_channels), "out_channels": int(out_channels),
            "base_channels": int(base_channels), "channel_mults": [int(m) for m in channel_mults],
            "attn_resolutions": [int(r) for r in attn_resolutions],
            "num_classes": int(num_classes), "extra_embed": bool(extra_embed), "groups": int(groups),
            "embed_dim": int(embed_dim),
            "zero_init_output": bool(zero_init_output), "image_size": int(image_size),
            "ode_method": str(ode_method), "ode_steps": int(ode_steps), "ode_backend": str(ode_backend),
            "ode_rtol": float(ode_rtol), "ode_atol": float(ode_atol), "ode_adjoint": bool(ode_adjoint),
        }
        _check_config(self.config)
        self.solver = ODESolver(ode_method, ode_steps, ode_backend, ode_rtol, ode_atol, ode_adjoint)
        self.in_channels = in_channels
        self.num_levels = len(channel_mults)
        self.bottleneck: Tensor | None = None

        widths = [base_channels * mult for mult in channel_mults]
        self.cond_embed = ConditionEmbedding(base_channels, embed_dim, num_classes, extra_embed)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0] // 2, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(widths[0] // 2, widths[0], 1))

        def stage(level: int) -> ODEStage:
            return ODEStage(widths[level], embed_dim, groups, self.solver, self._level_has_attention(level))

        shallow = range(self.num_levels - 1)  # every level but the deepest, shallowest first
        self.encoder = nn.ModuleList(stage(level) for level in shallow)
        self.widen = nn.ModuleList(nn.Conv2d(widths[level], widths[level + 1], 1) for level in shallow)
        self.middle = stage(self.num_levels - 1)
        self.reduce = nn.ModuleList(nn.Conv2d(widths[level + 1] + widths[level], widths[level], 1)
                                    for level in shallow)
        self.decoder = nn.ModuleList(stage(level) for level in shallow)
        self.norm_out = group_norm(widths[0], groups)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 1)
        if zero_init_output:
            zero_init(self.conv_out)

    def _level_has_attention(self, level: int) -> bool:
        return level_has_attention(level, self.num_levels, self.config["image_size"], self.config["attn_resolutions"])

    def forward(
        self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None,
        extra: Tensor | None = None,
    ) -> Tensor:
        """x: [B, C, H, W] float; c_noise: [B] float; class_labels: [B] long or None;
        extra: [B] float or None. Returns [B, out_channels, H, W].
        """
        self._check_x(x)
        emb = self.cond_embed(x.shape[0], c_noise, class_labels, extra)  # [B, embed_dim]
        height, width = x.shape[-2:]
        h = self.stem(pad_to_levels(x, self.num_levels))
        skips = []
        for stage, widen in zip(self.encoder, self.widen):
            h = stage(h, emb)
            skips.append(h)
            h = F.avg_pool2d(widen(h), 2)  # = bilinear ×½ on an even-sized map
        h = self.middle(h, emb)
        self.bottleneck = h
        for stage, reduce in zip(reversed(self.decoder), reversed(self.reduce)):
            h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
            h = stage(reduce(torch.cat([h, skips.pop()], dim=1)), emb)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h[..., :height, :width]

    def _check_x(self, x: Tensor) -> None:
        check_images(x, self.in_channels, type(self).__name__)


def _check_config(cfg: dict) -> None:
    """Raise ConfigError for options no cU-Net can be built from (ODE options: ODESolver;
    GroupNorm: per layer)."""
    for name in ("in_channels", "out_channels", "base_channels", "groups", "embed_dim", "image_size"):
        if cfg[name] < 1:
            raise ConfigError(f"CUNet {name} must be >= 1, got {cfg[name]}.")
    if not cfg["channel_mults"] or min(cfg["channel_mults"]) < 1:
        raise ConfigError(
            f"CUNet channel_mults must be a non-empty list of positive ints, got {cfg['channel_mults']}."
        )
    if cfg["base_channels"] % 2:
        raise ConfigError(
            f"CUNet base_channels must be even (it is also the sinusoidal embedding width and the "
            f"stem halves the first level's width), got {cfg['base_channels']}."
        )
