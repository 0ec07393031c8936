"""Conditioning embeddings shared by the networks: noise level, class label and a spare scalar.

Every network turns its conditioning into one vector per sample, `emb: [B, embed_dim]`, that its
blocks read. `ConditionEmbedding` builds it and checks the conditioning inputs before any work.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from difflab.core.errors import ConfigError, ShapeError


def sinusoidal_embedding(values: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal (Fourier) features of one scalar per sample (Vaswani et al. 2017, as in DDPM).

    values: [B] float. Returns [B, dim] = [cos(values·f_k), sin(values·f_k)], k < dim/2, with
    frequencies f_k spaced geometrically from 1 down to 1/max_period. Computed in float32.
    """
    half = dim // 2
    exponents = torch.arange(half, device=values.device, dtype=torch.float32) / max(half - 1, 1)
    frequencies = torch.exp(-math.log(max_period) * exponents)  # [dim/2], from 1 to 1/max_period
    angles = values.float()[:, None] * frequencies[None, :]  # [B, dim/2]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ScalarEmbedding(nn.Module):
    """A scalar per sample -> [B, out_dim]: sinusoidal features, then Linear-SiLU-Linear.

    With `zero_init_output` the last Linear starts at zero, so the embedding is exactly 0 for
    every input until training moves it (used for conditioning added to a trained model's input).
    """

    def __init__(self, freq_dim: int, out_dim: int, zero_init_output: bool = False):
        super().__init__()
        self.freq_dim = freq_dim
        self.hidden = nn.Linear(freq_dim, out_dim)
        self.output = nn.Linear(out_dim, out_dim)
        if zero_init_output:
            nn.init.zeros_(self.output.weight)
            nn.init.zeros_(self.output.bias)

    def forward(self, values: Tensor) -> Tensor:
        """values: [B] float -> [B, out_dim]."""
        features = sinusoidal_embedding(values, self.freq_dim).to(self.hidden.weight.dtype)
        return self.output(nn.functional.silu(self.hidden(features)))


def _check_per_sample(name: str, value: object, batch_size: int, integer: bool) -> None:
    """Raise ShapeError unless `value` is a tensor of shape [batch_size] of the right dtype kind."""
    kind = "integer (torch.long)" if integer else "floating-point"
    if not isinstance(value, Tensor):
        raise ShapeError(
            f"{name} must be a {kind} tensor of shape [B] = [{batch_size}], "
            f"got {type(value).__name__}."
        )
    if tuple(value.shape) != (batch_size,):
        raise ShapeError(
            f"{name} must have shape [B] = [{batch_size}] (one value per sample of x), "
            f"got shape {list(value.shape)}; expand a scalar with `.expand({batch_size})`."
        )
    is_integer = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    if integer != is_integer:
        raise ShapeError(f"{name} must be {kind}, got dtype {value.dtype}.")


class ConditionEmbedding(nn.Module):
    """The per-sample conditioning vector a network's blocks read.

    emb = time_embed(c_noise) + class_embed(class_labels) + extra_embed(extra), each [B, embed_dim].

    - c_noise: [B] float, the network's (already preconditioned) noise input.
    - class_labels: [B] long, only when num_classes > 0. A negative label is the null class
      (unconditional, for classifier-free guidance): row `num_classes` of a table with
      num_classes + 1 rows. None means every sample is null.
    - extra: [B] float, only when built with extra_embed=True; a spare scalar (e.g. a guidance
      weight) whose embedding's last layer starts at zero, so at construction it has no effect.
      None means no contribution.
    """

    def __init__(
        self, freq_dim: int, embed_dim: int, num_classes: int = 0, extra_embed: bool = False
    ):
        super().__init__()
        if freq_dim < 2 or freq_dim % 2:
            raise ConfigError(
                f"the sinusoidal embedding width must be even and >= 2, got {freq_dim}."
            )
        if num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}.")
        self.num_classes = num_classes
        self.time_embed = ScalarEmbedding(freq_dim, embed_dim)
        self.class_embed = nn.Embedding(num_classes + 1, embed_dim) if num_classes > 0 else None
        self.extra_embed = (
            ScalarEmbedding(freq_dim, embed_dim, zero_init_output=True) if extra_embed else None
        )

    def check_inputs(
        self, batch_size: int, c_noise: Tensor, class_labels: Tensor | None, extra: Tensor | None
    ) -> None:
        """Raise ShapeError, saying what was given and what is expected, for any bad input."""
        _check_per_sample("c_noise", c_noise, batch_size, integer=False)
        if class_labels is not None:
            if self.class_embed is None:
                raise ShapeError(
                    "class_labels were given to an unconditional network (num_classes=0); "
                    "pass class_labels=None or build the network with num_classes > 0."
                )
            _check_per_sample("class_labels", class_labels, batch_size, integer=True)
            if class_labels.numel() and int(class_labels.max()) >= self.num_classes:
                raise ShapeError(
                    f"class_labels must be < num_classes = {self.num_classes} (or negative for the "
                    f"null class), got a label {int(class_labels.max())}."
                )
        if extra is not None:
            if self.extra_embed is None:
                raise ShapeError(
                    "extra was given to a network built without an extra embedding; "
                    "pass extra=None or build the network with extra_embed=True."
                )
            _check_per_sample("extra", extra, batch_size, integer=False)

    def forward(
        self, batch_size: int, c_noise: Tensor, class_labels: Tensor | None = None,
        extra: Tensor | None = None,
    ) -> Tensor:
        """c_noise: [B] float; class_labels: [B] long or None; extra: [B] float or None.

        Returns [B, embed_dim]. batch_size is B of the network input x; the inputs are checked
        against it first.
        """
        self.check_inputs(batch_size, c_noise, class_labels, extra)
        emb = self.time_embed(c_noise)
        if self.class_embed is not None:
            emb = emb + self.class_embed(self._table_rows(class_labels, c_noise))
        if self.extra_embed is not None and extra is not None:
            emb = emb + self.extra_embed(extra)
        return emb

    def _table_rows(self, class_labels: Tensor | None, c_noise: Tensor) -> Tensor:
        """Rows of the class table: the label, or the null row `num_classes` for None / negative."""
        null = torch.full_like(c_noise, self.num_classes, dtype=torch.long)
        if class_labels is None:
            return null
        return torch.where(class_labels < 0, null, class_labels.long())
