"""The `Dataset` container and scikit-learn's handwritten digits with a fixed held-out split."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from difflab.core.errors import ConfigError, ShapeError, UnknownNameError

DIGITS_NUM_TEST = 297  # 1,797 images: the first 1,500 of the fixed permutation train, the rest test
DIGITS_SPLITS = ("train", "test", "all")


@dataclass(eq=False)  # tensors have no single truth value; compare fields explicitly
class Dataset:
    """An in-memory data set.

    x: [N, ...] float32 (images [N, C, H, W] in [-1, 1]; vectors [N, D]);
    labels: [N] int64 in [0, num_classes) or None; num_classes is 0 when there are no labels.
    """

    x: torch.Tensor
    labels: torch.Tensor | None
    name: str
    num_classes: int

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or self.x.dtype != torch.float32 or self.x.dim() < 2:
            raise ShapeError(
                f"Dataset {self.name!r}: x is {_describe(self.x)}; expected a float32 tensor [N, ...] "
                "with at least 2 dims. Convert with torch.as_tensor(x, dtype=torch.float32)."
            )
        if self.labels is None:
            return
        if (not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64
                or tuple(self.labels.shape) != (len(self.x),)):
            raise ShapeError(
                f"Dataset {self.name!r}: labels are {_describe(self.labels)}; expected an int64 tensor "
                f"[{len(self.x)}] (one label per sample) or None."
            )
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ShapeError(
                f"Dataset {self.name!r}: labels span [{int(self.labels.min())}, {int(self.labels.max())}] "
                f"but num_classes={self.num_classes}; expected labels in [0, num_classes)."
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-sample shape, e.g. (1, 8, 8) for digits or (2,) for 2-D toy data."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, indices: torch.Tensor) -> Dataset:
        """The samples at `indices` ([M] int64), as a new Dataset with the same name and classes."""
        labels = None if self.labels is None else self.labels[indices]
        return Dataset(self.x[indices], labels, self.name, self.num_classes)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits in scikit-learn's order: x [1797, 1, 8, 8] in [-1, 1], labels [1797]."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32)).reshape(-1, 1, 8, 8) / 8.0 - 1.0  # 0..16
    return x, torch.from_numpy(bunch.target.astype(np.int64))


def digits_split_indices(split: str = "train") -> torch.Tensor:
    """Indices into scikit-learn's digit order for `split`: [1500] train, [297] test, [1797] all.

    Train and test are the first 1,500 and the last 297 entries of the fixed permutation
    `numpy.random.default_rng(0).permutation(1797)`; "all" is the original order.
    """
    if split not in DIGITS_SPLITS:
        raise UnknownNameError(
            f"Unknown digits split {split!r}; expected one of {', '.join(DIGITS_SPLITS)}."
        )
    num_images = len(_digits_arrays()[0])
    if split == "all":
        return torch.arange(num_images)
    permutation = torch.from_numpy(np.random.default_rng(0).permutation(num_images))
    num_train = num_images - DIGITS_NUM_TEST
    return permutation[:num_train] if split == "train" else permutation[num_train:]


def load_digits(split: str = "train") -> Dataset:
    """scikit-learn's 8x8 handwritten digits: x [N, 1, 8, 8] float32 in [-1, 1], labels 0..9.

    split: "train" (1,500 images), "test" (297, held out) or "all" (1,797). The split is fixed
    (see `digits_split_indices`). The returned tensors are fresh copies; changing them does not
    affect later calls.
    """
    x, labels = _digits_arrays()
    indices = digits_split_indices(split)
    return Dataset(x[indices].clone(), labels[indices].clone(), "digits", 10)


def check_positive_count(n, what: str = "samples") -> int:
    """`n` as an int if it is a positive integer, else a ConfigError naming the value."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n={n!r} {what} requested; expected a positive integer.")
    return int(n)
