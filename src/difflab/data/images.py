"""Image data from disk: a folder of PNG/JPEG files, or a Hugging Face dataset saved to disk.

Both give a `Dataset` with x [N, C, H, W] float32 in [-1, 1].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from difflab.core.errors import ConfigError, ShapeError, UnknownNameError
from difflab.data.digits import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_COLOUR_MODES = {1: "L", 3: "RGB"}


class ImageFolder(Dataset):
    """Every PNG/JPEG under `path`, loaded with PIL into x [N, C, H, W] float32 in [-1, 1].

    Layout: either all images directly under `path` (labels None), or one sub-folder per class
    (`path/cat/*.png`, `path/dog/*.jpg`, nested folders allowed): labels index the sorted class
    names, kept in `.class_names`.
    size: None (all images must share one size), an int (square) or (H, W): resize every image.
    channels: 1 (greyscale), 3 (RGB) or None (1 if every image is greyscale, else 3).
    """

    def __init__(self, path: str | os.PathLike, size: int | tuple[int, int] | None = None,
                 channels: int | None = None) -> None:
        root = _existing_folder(path)
        files, labels, class_names = _list_images(root)
        names = [str(f.relative_to(root)) for f in files]
        x = images_to_tensor([_open_image(f) for f in files], size, channels, names)
        label_tensor = None if labels is None else torch.tensor(labels, dtype=torch.int64)
        super().__init__(x, label_tensor, root.name, len(class_names))
        self.path = root
        self.class_names = class_names


def _existing_folder(path: str | os.PathLike) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise ConfigError(
            f"Image folder {str(root)!r} {what}; expected a folder of PNG/JPEG images "
            "(or one sub-folder per class). Check the path."
        )
    return root


def _is_visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _list_images(root: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """Image files (sorted), their labels (None without class sub-folders) and the class names."""
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                   and f.is_file() and _is_visible(f, root))
    if not files:
        raise ConfigError(
            f"No images found under {str(root)!r}; expected files ending in "
            f"{', '.join(IMAGE_SUFFIXES)} (any case). Point to the folder that holds them."
        )
    at_top = [f for f in files if f.parent == root]
    if len(at_top) == len(files):
        return files, None, []
    if at_top:
        raise ConfigError(
            f"{str(root)!r} holds {len(at_top)} images directly (e.g. {at_top[0].name!r}) and "
            f"{len(files) - len(at_top)} in sub-folders; expected either no sub-folders (unlabelled) "
            "or every image inside a class sub-folder. Move the loose images into a sub-folder."
        )
    class_of = [f.relative_to(root).parts[0] for f in files]
    class_names = sorted(set(class_of))
    index = {name: i for i, name in enumerate(class_names)}
    return files, [index[name] for name in class_of], class_names


def _open_image(file: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError) as error:
        raise ConfigError(f"Cannot read image {str(file)!r} ({error}); delete or re-save it.") from error


def _target_size(size) -> tuple[int, int] | None:
    """(H, W) from None, an int or a pair."""
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ConfigError(f"size={size!r}; expected a positive int or a pair (H, W) of positive ints.")
    return pair


def images_to_tensor(images: list, size=None, channels: int | None = None,
                     names: list[str] | None = None) -> torch.Tensor:
    """PIL images -> x [N, C, H, W] float32 in [-1, 1] (uint8 / 127.5 - 1).

    size: None, int or (H, W) (see ImageFolder); channels: 1, 3 or None (inferred);
    names: one per image, used in error messages.
    """
    from PIL import Image

    if channels not in (None, 1, 3):
        raise ConfigError(f"channels={channels!r}; expected 1 (greyscale), 3 (RGB) or None (infer).")
    if channels is None:
        channels = 1 if all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in images) else 3
    target = _target_size(size)
    names = names or [f"image {i}" for i in range(len(images))]
    arrays = []
    for image in images:
        image = image.convert(_COLOUR_MODES[channels])
        if target is not None and image.size != (target[1], target[0]):
            image = image.resize((target[1], target[0]), Image.Resampling.BICUBIC)  # PIL wants (W, H)
        array = np.asarray(image, dtype=np.uint8)
        arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    _check_same_size(arrays, names)
    return torch.from_numpy(np.stack(arrays)).float() / 127.5 - 1.0


def _check_same_size(arrays: list[np.ndarray], names: list[str]) -> None:
    first = arrays[0].shape[1:]
    for array, name in zip(arrays, names):
        if array.shape[1:] != first:
            raise ShapeError(
                f"Images differ in size: {names[0]!r} is {first[0]}x{first[1]} (HxW) but {name!r} is "
                f"{array.shape[1]}x{array.shape[2]}; expected one size. Pass size=(H, W) (or an int) "
                "to resize them all."
            )


def load_hf_dataset(path: str | os.PathLike, image_column: str = "image",
                    label_column: str | None = None, size=None, channels: int | None = None,
                    split: str = "train") -> Dataset:
    """A Hugging Face dataset saved with `save_to_disk`, as x [N, C, H, W] in [-1, 1].

    Reads `datasets.load_from_disk(path)` (nothing is downloaded); a DatasetDict gives `split`.
    label_column: the integer label column; None uses "label" or "labels" if present, else no
    labels. size, channels: as in ImageFolder. Needs the optional extra `difflab[hf]`.
    """
    try:
        import datasets
    except ImportError as error:
        raise ConfigError(
            f"Loading the Hugging Face dataset at {str(path)!r} needs the `datasets` package, which "
            "is not installed. Install it with `pip install difflab[hf]` (or `pip install datasets`)."
        ) from error
    table = _pick_split(datasets.load_from_disk(str(_existing_folder(path))), split, path)
    _require_column(table, image_column, "image_column", path)
    if label_column is None:
        label_column = next((c for c in ("label", "labels") if c in table.column_names), None)
    images = [_as_pil(value, i) for i, value in enumerate(table[image_column])]
    x = images_to_tensor(images, size, channels, [f"row {i}" for i in range(len(images))])
    if label_column is None:
        return Dataset(x, None, Path(path).name, 0)
    _require_column(table, label_column, "label_column", path)
    labels = torch.as_tensor(table[label_column], dtype=torch.int64)
    feature = table.features[label_column]
    num_classes = getattr(feature, "num_classes", None) or int(labels.max()) + 1
    return Dataset(x, labels, Path(path).name, num_classes)


def _pick_split(loaded, split: str, path):
    if not hasattr(loaded, "column_names") or isinstance(loaded.column_names, dict):  # DatasetDict
        if split not in loaded:
            raise UnknownNameError(
                f"Split {split!r} is not in the dataset at {str(path)!r}; it has "
                f"{', '.join(sorted(loaded))}. Pass split= one of those."
            )
        return loaded[split]
    return loaded


def _require_column(table, column: str, argument: str, path) -> None:
    if column not in table.column_names:
        raise UnknownNameError(
            f"Column {column!r} is not in the dataset at {str(path)!r}; its columns are "
            f"{', '.join(table.column_names)}. Pass {argument}= one of those."
        )


def _as_pil(value, row: int):
    """A dataset cell (PIL image, {"bytes" | "path"} dict, or array) as a PIL image."""
    import io

    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return Image.open(value["path"])
    array = np.asarray(value)
    if array.ndim in (2, 3) and array.dtype == np.uint8:
        return Image.fromarray(array)
    raise ShapeError(
        f"Row {row}: image cell is a {type(value).__name__} of shape {array.shape}; expected a PIL "
        "image, a dict with 'bytes' or 'path', or a uint8 array [H, W] or [H, W, C]."
    )
