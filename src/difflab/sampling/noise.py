"""Per-sample seeding: sample i's noise depends only on its own seed, not on batch size or rank."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class PerSampleGenerator:
    """One torch.Generator per sample; `randn(shape)` draws row i from generator i.

    Used for the initial noise and for stochastic solvers' per-step noise, so the same seeds give
    the same samples whatever the batch size or number of processes.
    """

    def __init__(self, seeds: Sequence[int]):
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device="cpu") -> Tensor:
        """[len(seeds), *shape] standard normal noise, drawn on the CPU then moved to `device`."""
        rows = [torch.randn(tuple(shape), generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device)


def randn_like(x: Tensor, generator: torch.Generator | PerSampleGenerator | None = None) -> Tensor:
    """Standard normal noise shaped like x, from a torch.Generator, a PerSampleGenerator or the global RNG."""
    if isinstance(generator, PerSampleGenerator):
        if len(generator.generators) != x.shape[0]:
            raise ValueError(f"PerSampleGenerator has {len(generator.generators)} seeds for a batch of {x.shape[0]}")
        return generator.randn(x.shape[1:], dtype=x.dtype, device=x.device)
    if generator is not None and generator.device != x.device:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], sigma_max: float = 1.0,
                 dtype: torch.dtype = torch.float32, device="cpu") -> Tensor:
    """Initial states σ_max·z with z drawn per sample from its own seed: [len(seeds), *shape]."""
    return sigma_max * PerSampleGenerator(seeds).randn(shape, dtype=dtype, device=device)
