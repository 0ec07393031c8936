"""A residual MLP for vectors [B, D] (2-D toy data and other low-dimensional problems)."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from difflab.core.errors import ConfigError, ShapeError
from difflab.nets.embeddings import ConditionEmbedding


class ResidualBlock(nn.Module):
    """h + Linear(SiLU(Linear(LayerNorm(h)) + Linear(SiLU(emb)))); h: [B, H], emb: [B, E]."""

    def __init__(self, hidden: int, embed_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.linear_in = nn.Linear(hidden, hidden)
        self.embed_proj = nn.Linear(embed_dim, hidden)
        self.linear_out = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """h: [B, H], emb: [B, E] -> [B, H]."""
        update = self.linear_in(self.norm(h)) + self.embed_proj(F.silu(emb))
        return h + self.linear_out(F.silu(update))


class MLP(nn.Module):
    """Residual MLP denoiser network: net(x [B, dim], c_noise [B], class_labels, extra) -> [B, dim].

    Args:
        dim: data dimension D.
        hidden: width H of the residual stream.
        depth: number of residual blocks (>= 1).
        embed_dim: number of sinusoidal features of c_noise (and of extra); even.
        num_classes: 0 for an unconditional net; else labels 0..num_classes-1, negative = null.
        extra_embed: accept a spare scalar `extra` [B] whose embedding starts at exactly zero.
        zero_init_output: the output layer starts at zero, so the initial output is exactly 0.

    After each call `self.bottleneck` holds the middle hidden activation [B, H] (not detached).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 4,
        embed_dim: int = 64,
        num_classes: int = 0,
        extra_embed: bool = False,
        zero_init_output: bool = True,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"MLP {name} must be a positive int, got {value!r}.")
        self.config = {
            "dim": int(dim), "hidden": int(hidden), "depth": int(depth),
            "embed_dim": int(embed_dim), "num_classes": int(num_classes),
            "extra_embed": bool(extra_embed), "zero_init_output": bool(zero_init_output),
        }
        self.dim = dim
        self.cond_embed = ConditionEmbedding(embed_dim, hidden, num_classes, extra_embed)
        self.input_proj = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, hidden) for _ in range(depth))
        self.output_norm = nn.LayerNorm(hidden)
        self.output_proj = nn.Linear(hidden, dim)
        if zero_init_output:
            nn.init.zeros_(self.output_proj.weight)
            nn.init.zeros_(self.output_proj.bias)
        self.middle_block = (depth + 1) // 2  # the bottleneck is read after this many blocks
        self.bottleneck: Tensor | None = None

    def forward(
        self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None,
        extra: Tensor | None = None,
    ) -> Tensor:
        """x: [B, dim] float; c_noise: [B] float; class_labels: [B] long or None;
        extra: [B] float or None. Returns [B, dim].
        """
        self._check_x(x)
        emb = self.cond_embed(x.shape[0], c_noise, class_labels, extra)  # [B, H]
        h = self.input_proj(x)
        for index, block in enumerate(self.blocks, start=1):
            h = block(h, emb)
            if index == self.middle_block:
                self.bottleneck = h
        return self.output_proj(F.silu(self.output_norm(h)))

    def _check_x(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != self.dim:
            given = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(
                f"MLP expects x of shape [B, {self.dim}], got {given}; "
                "flatten the data to vectors or build the MLP with the right `dim`."
            )
        if not x.is_floating_point():
            raise ShapeError(f"MLP expects a floating-point x, got dtype {x.dtype}.")
