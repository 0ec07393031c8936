"""A DDPM-style U-Net for images [B, C, H, W] (Ho et al. 2020, with scale-shift conditioning).

Encoder: per level, `num_res_blocks` ResBlocks (+ self-attention at the feature-map sizes in
`attn_resolutions`) and a stride-2 conv; middle: ResBlock-Attention-ResBlock; decoder: per level,
`num_res_blocks + 1` ResBlocks each reading one concatenated encoder skip, and a nearest ×2
upsample + conv. Inputs of any size work: they are zero-padded up to a multiple of 2^(levels-1)
and the output is cropped back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from difflab.core.errors import ConfigError, ShapeError
from difflab.nets.embeddings import ConditionEmbedding

ATTENTION_HEAD_CHANNELS = 64  # channels per attention head; fewer or indivisible -> one head


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm, with a clear error when `groups` does not divide `channels`."""
    if channels % groups:
        raise ConfigError(
            f"GroupNorm groups={groups} does not divide a layer's {channels} channels; choose "
            f"`groups` dividing base_channels * every channel_mult (and their skip sums)."
        )
    return nn.GroupNorm(groups, channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero and return it."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv3x3, scale-shift by emb, SiLU, dropout, Conv3x3 (zero-init), + skip."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, groups: int,
                 dropout: float):
        super().__init__()
        self.norm_in = group_norm(in_channels, groups)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embed_proj = nn.Linear(embed_dim, 2 * out_channels)  # -> (scale, shift)
        self.norm_out = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        same_channels = in_channels == out_channels
        self.skip = nn.Identity() if same_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: [B, C_in, H, W], emb: [B, E] -> [B, C_out, H, W]."""
        h = self.conv_in(F.silu(self.norm_in(x)))
        scale, shift = self.embed_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm_out(h) * (1 + scale) + shift
        h = self.conv_out(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Residual multi-head self-attention over the pixels of a feature map; output starts at 0."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))
        divisible = channels % ATTENTION_HEAD_CHANNELS == 0
        self.num_heads = channels // ATTENTION_HEAD_CHANNELS if divisible else 1

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, self.num_heads, -1, height * width)
        query, key, value = qkv.transpose(-1, -2).unbind(dim=1)  # each [B, heads, HW, C/heads]
        attended = F.scaled_dot_product_attention(query, key, value)
        attended = attended.transpose(-1, -2).reshape(batch, channels, height, width)
        return x + self.proj(attended)


class ResAttnBlock(nn.Module):
    """A ResBlock, followed by self-attention when `attention` is True."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, groups: int,
                 dropout: float, attention: bool):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, embed_dim, groups, dropout)
        self.attn = SelfAttention(out_channels, groups) if attention else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: [B, C_in, H, W], emb: [B, E] -> [B, C_out, H, W]."""
        return self.attn(self.res(x, emb))


class MiddleBlock(nn.Module):
    """ResBlock-Attention-ResBlock at the lowest resolution."""

    def __init__(self, channels: int, embed_dim: int, groups: int, dropout: float):
        super().__init__()
        self.res_first = ResBlock(channels, channels, embed_dim, groups, dropout)
        self.attn = SelfAttention(channels, groups)
        self.res_second = ResBlock(channels, channels, embed_dim, groups, dropout)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: [B, C, h, w], emb: [B, E] -> [B, C, h, w]."""
        return self.res_second(self.attn(self.res_first(x, emb)), emb)


class Downsample(nn.Module):
    """Stride-2 conv3x3: [B, C, H, W] -> [B, C, H/2, W/2] (H, W even)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest ×2 then conv3x3: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """DDPM-style U-Net: net(x [B, C, H, W], c_noise [B], class_labels, extra) -> [B, C_out, H, W].

    Args:
        in_channels: channels C of x.
        out_channels: channels of the output; None means in_channels.
        base_channels: channels at the first level; level i has base_channels * channel_mults[i].
        channel_mults: one multiplier per resolution level (len = number of levels).
        num_res_blocks: ResBlocks per encoder level (the decoder has one more per level).
        attn_resolutions: feature-map sizes (side lengths, counted from `image_size`) at which
            self-attention follows each ResBlock.
        dropout: dropout probability inside the ResBlocks.
        num_classes: 0 for an unconditional net; else labels 0..num_classes-1, negative = null.
        extra_embed: accept a spare scalar `extra` [B] whose embedding starts at exactly zero.
        groups: GroupNorm groups; must divide every layer's channel count.
        zero_init_output: the output conv starts at zero, so the initial output is exactly 0.
        image_size: the nominal input side length, used only to place attention by feature-map
            size; inputs of any size work. Level i of an S-sized input has size P / 2^i, where
            P is S padded up to a multiple of 2^(levels-1).

    After each call `self.bottleneck` holds the middle block's output [B, C_mid, h, w]
    (h = ceil(H / 2^(levels-1)), w likewise; not detached).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_resolutions: Sequence[int] = (4,),
        dropout: float = 0.0,
        num_classes: int = 0,
        extra_embed: bool = False,
        groups: int = 8,
        zero_init_output: bool = True,
        image_size: int = 8,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.config = {
            "in_channels": int(in_channels), "out_channels": int(out_channels),
            "base_channels": int(base_channels), "channel_mults": [int(m) for m in channel_mults],
            "num_res_blocks": int(num_res_blocks),
            "attn_resolutions": [int(r) for r in attn_resolutions], "dropout": float(dropout),
            "num_classes": int(num_classes), "extra_embed": bool(extra_embed),
            "groups": int(groups), "zero_init_output": bool(zero_init_output),
            "image_size": int(image_size),
        }
        _check_config(self.config)
        self.in_channels = in_channels
        self.num_levels = len(channel_mults)
        self.bottleneck: Tensor | None = None

        embed_dim = 4 * base_channels
        self.cond_embed = ConditionEmbedding(base_channels, embed_dim, num_classes, extra_embed)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.encoder, skip_channels = self._build_encoder(embed_dim)
        mid_channels = base_channels * channel_mults[-1]
        self.middle = MiddleBlock(mid_channels, embed_dim, groups, dropout)
        self.decoder = self._build_decoder(embed_dim, skip_channels)
        self.norm_out = group_norm(base_channels, groups)
        self.conv_out = nn.Conv2d(base_channels, out_channels, 3, padding=1)
        if zero_init_output:
            zero_init(self.conv_out)

    def _level_has_attention(self, level: int) -> bool:
        return level_has_attention(level, self.num_levels, self.config["image_size"], self.config["attn_resolutions"])

    def _build_encoder(self, embed_dim: int) -> tuple[nn.ModuleList, list[int]]:
        """Encoder layers, and the channel count of each skip the decoder will read (in order)."""
        cfg = self.config
        layers, channels = nn.ModuleList(), cfg["base_channels"]
        skip_channels = [channels]  # conv_in's output
        for level, mult in enumerate(cfg["channel_mults"]):
            attention = self._level_has_attention(level)
            for _ in range(cfg["num_res_blocks"]):
                out_channels = cfg["base_channels"] * mult
                layers.append(ResAttnBlock(channels, out_channels, embed_dim, cfg["groups"],
                                           cfg["dropout"], attention))
                channels = out_channels
                skip_channels.append(channels)
            if level < self.num_levels - 1:
                layers.append(Downsample(channels))
                skip_channels.append(channels)
        return layers, skip_channels

    def _build_decoder(self, embed_dim: int, skip_channels: list[int]) -> nn.ModuleList:
        """Decoder layers; each ResAttnBlock reads the last unread encoder skip, concatenated."""
        cfg = self.config
        layers, skips = nn.ModuleList(), list(skip_channels)
        channels = cfg["base_channels"] * cfg["channel_mults"][-1]
        for level in reversed(range(self.num_levels)):
            attention = self._level_has_attention(level)
            for _ in range(cfg["num_res_blocks"] + 1):
                out_channels = cfg["base_channels"] * cfg["channel_mults"][level]
                layers.append(ResAttnBlock(channels + skips.pop(), out_channels, embed_dim,
                                           cfg["groups"], cfg["dropout"], attention))
                channels = out_channels
            if level > 0:
                layers.append(Upsample(channels))
        return layers

    def forward(
        self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None,
        extra: Tensor | None = None,
    ) -> Tensor:
        """x: [B, C, H, W] float; c_noise: [B] float; class_labels: [B] long or None;
        extra: [B] float or None. Returns [B, out_channels, H, W].
        """
        self._check_x(x)
        emb = self.cond_embed(x.shape[0], c_noise, class_labels, extra)  # [B, 4·base_channels]
        height, width = x.shape[-2:]
        h = self.conv_in(pad_to_levels(x, self.num_levels))
        skips = [h]
        for layer in self.encoder:
            h = layer(h) if isinstance(layer, Downsample) else layer(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        self.bottleneck = h
        for layer in self.decoder:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:  # each decoder ResBlock reads one encoder skip, last-in first-out
                h = layer(torch.cat([h, skips.pop()], dim=1), emb)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h[..., :height, :width]

    def _check_x(self, x: Tensor) -> None:
        check_images(x, self.in_channels, type(self).__name__)


def pad_to_levels(x: Tensor, num_levels: int) -> Tensor:
    """Zero-pad images [B, C, H, W] at the bottom/right up to a multiple of 2^(num_levels−1) (cropped back later)."""
    multiple = 2 ** (num_levels - 1)
    return F.pad(x, (0, -x.shape[-1] % multiple, 0, -x.shape[-2] % multiple))


def level_has_attention(level: int, num_levels: int, image_size: int, attn_resolutions) -> bool:
    """Whether level `level` (size padded_image_size / 2^level) is in attn_resolutions."""
    multiple = 2 ** (num_levels - 1)
    padded_size = -(-image_size // multiple) * multiple
    return padded_size // 2**level in attn_resolutions


def check_images(x: Tensor, in_channels: int, network: str) -> None:
    """Raise ShapeError unless x is a floating-point image batch [B, in_channels, H, W]."""
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != in_channels:
        given = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ShapeError(
            f"{network} expects images x of shape [B, {in_channels}, H, W], got {given}; "
            f"add a channel axis (x[:, None]) or build the {network} with the right `in_channels`."
        )
    if not x.is_floating_point():
        raise ShapeError(f"{network} expects a floating-point x, got dtype {x.dtype}.")


def _check_config(cfg: dict) -> None:
    """Raise ConfigError for options no U-Net can be built from (GroupNorm is checked per layer)."""
    positive = ("in_channels", "out_channels", "base_channels", "num_res_blocks", "groups",
                "image_size")
    for name in positive:
        if cfg[name] < 1:
            raise ConfigError(f"UNet {name} must be >= 1, got {cfg[name]}.")
    if not cfg["channel_mults"] or min(cfg["channel_mults"]) < 1:
        raise ConfigError(
            "UNet channel_mults must be a non-empty list of positive ints, "
            f"got {cfg['channel_mults']}."
        )
    if cfg["base_channels"] % 2:
        raise ConfigError(
            f"UNet base_channels must be even (it is also the sinusoidal embedding width), "
            f"got {cfg['base_channels']}."
        )
    if not 0.0 <= cfg["dropout"] < 1.0:
        raise ConfigError(f"UNet dropout must be in [0, 1), got {cfg['dropout']}.")
