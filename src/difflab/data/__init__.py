"""Data sets as in-memory tensors: 2-D toys, scikit-learn digits, MNIST, image folders, HF datasets.

`get_dataset(name_or_path)` is the one entry point the CLI and the trainers use.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from difflab.core.errors import ConfigError, UnknownNameError
from difflab.data.digits import Dataset, check_positive_count, digits_split_indices, load_digits
from difflab.data.images import ImageFolder, images_to_tensor, load_hf_dataset
from difflab.data.mnist import fetch_mnist, load_mnist, mnist_cache_path
from difflab.data.toy import default_gmm, make_gmm, make_moons, make_rings

TOY_DATASETS = {"moons": make_moons, "rings": make_rings, "gmm": make_gmm}
IMAGE_DATASETS = {"digits": load_digits, "mnist": load_mnist}   # name -> loader(split)
DATASET_NAMES = (*IMAGE_DATASETS, *TOY_DATASETS)
DEFAULT_TOY_SIZE = 10_000
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")

__all__ = [
    "DATASET_NAMES", "Dataset", "IMAGE_DATASETS", "ImageFolder", "default_gmm", "digits_split_indices",
    "fetch_mnist", "get_dataset", "images_to_tensor", "keep_classes", "load_digits", "load_hf_dataset",
    "load_mnist", "make_gmm", "make_moons", "make_rings", "mnist_cache_path", "model_class_list", "model_classes",
    "model_dataset",
]


def get_dataset(name_or_path: str | os.PathLike, n: int | None = None, seed: int = 0,
                split: str = "train") -> Dataset:
    """A data set by name ("digits", "mnist", "moons", "rings", "gmm") or by folder path.

    2-D sets: n samples (default 10,000) drawn with `seed`. Digits and MNIST: the `split` ("train",
    "test", "all"; MNIST from its cache, see `load_mnist`). A folder: a Hugging Face dataset saved to
    disk if it holds dataset_info.json, state.json or dataset_dict.json, else an image folder. For
    named image sets and folders, n (if given)
    keeps a random subset of n samples chosen with `seed`.
    """
    name = str(name_or_path)
    if not name.strip():   # Path("") is the current directory: never train on it by accident
        raise ConfigError(f"the data set name is empty; expected one of {', '.join(DATASET_NAMES)} or a folder path")
    if name in TOY_DATASETS:
        return TOY_DATASETS[name](DEFAULT_TOY_SIZE if n is None else n, seed)
    if name in IMAGE_DATASETS:
        dataset = IMAGE_DATASETS[name](split)
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        is_hf = any((folder / marker).is_file() for marker in _HF_MARKERS)
        dataset = load_hf_dataset(folder, split=split) if is_hf else ImageFolder(folder)
    else:
        raise UnknownNameError(
            f"Unknown data set {name!r}: it is neither a built-in name nor an existing folder. "
            f"Expected one of {', '.join(DATASET_NAMES)}, or the path of an image folder or of a "
            "Hugging Face dataset saved with save_to_disk."
        )
    return dataset if n is None else _random_subset(dataset, n, seed)


def _random_subset(dataset: Dataset, n: int, seed: int) -> Dataset:
    n = check_positive_count(n)
    if n > len(dataset):
        raise ConfigError(
            f"n={n} samples requested but {dataset.name!r} has {len(dataset)}; pass n <= {len(dataset)} "
            "or n=None for all of them."
        )
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return dataset.subset(keep)


def keep_classes(dataset: Dataset, classes: list[int] | None, name: str = "the data set") -> Dataset:
    """The samples of `dataset` whose label is in `classes`, labels unchanged (None: all of them).

    Raises ConfigError if the data set has no labels or one of the classes has no sample.
    """
    if classes is None:
        return dataset
    if dataset.labels is None:
        raise ConfigError(f"keeping classes {list(classes)} needs labels, but data set {name!r} has none")
    present = sorted(int(c) for c in dataset.labels.unique())
    absent = [c for c in classes if c not in present]
    if absent:
        raise ConfigError(f"data set {name!r} has no samples of class(es) {absent}; its classes are {present}")
    return dataset.subset(torch.isin(dataset.labels, torch.tensor(list(classes))).nonzero().squeeze(1))


def model_classes(model) -> list[int] | None:
    """The classes a model was trained on when it kept only some (`difflab train --keep-classes`),
    read from its meta or, for a distilled student, from what it was distilled on; else None."""
    meta = getattr(model, "meta", None) or {}
    distilled = getattr(model, "distilled", None) or {}
    return meta.get("kept_classes") or distilled.get("kept_classes")


def model_class_list(model, num_classes: int) -> list[int]:
    """The labels 0..num_classes-1 that `model` was trained on (all, unless it kept some only)."""
    kept = model_classes(model)
    return [c for c in range(num_classes) if kept is None or c in kept]


def model_dataset(name: str | os.PathLike, model, n: int | None = None, seed: int = 0,
                  split: str = "train") -> Dataset:
    """`get_dataset(name, n, seed, split)` as `model` saw it: only the classes it was trained on when
    it kept some (`difflab train --keep-classes`) and the data have labels. A toy set is drawn
    larger, restricted, then cut to n, so n samples of the kept classes remain."""
    kept = model_classes(model)
    if kept is None:
        return get_dataset(name, n=n, seed=seed, split=split)
    toy = str(name) in TOY_DATASETS
    dataset = get_dataset(name, n=max(DEFAULT_TOY_SIZE, 4 * n) if toy and n else None, seed=seed, split=split)
    if dataset.labels is not None:   # unlabelled data (a folder of images) is taken as given
        dataset = keep_classes(dataset, kept, str(name))
    return dataset if n is None else _random_subset(dataset, n, seed)
