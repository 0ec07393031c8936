"""The digit classifier generalised to 28×28 (MNIST), on a synthetic stand-in written as IDX files.

The stand-in goes through the real loader (`$DIFFLAB_MNIST_DIR`, the layout torchvision writes), so
these tests never need the real data; the last one uses it only when it is cached.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.core.errors import ConfigError, ShapeError, UnknownNameError
from difflab.data import get_dataset, mnist_cache_path
from difflab.metrics import frechet, frechet_floor, get_classifier
from difflab.metrics.digit_classifier import (
    CLASSIFIER_CONFIGS,
    DigitClassifier,
    data_fingerprint,
    load_digit_classifier,
)

NUM_TRAIN, NUM_TEST = 400, 100
REAL_MNIST = None if os.environ.get("DIFFLAB_MNIST_DIR") else mnist_cache_path()  # before any fixture changes the env


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """images [n, 28, 28] uint8, labels [n]: class k is a bright 5×5 square in cell k of a 2×5 grid, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 60, size=(n, 28, 28))
    for image, label in zip(images, labels):
        top, left = 4 + 12 * (label // 5), 1 + 5 * (label % 5) + rng.integers(0, 2)
        image[top:top + 5, left:left + 5] = rng.integers(180, 256)
    return images.astype(np.uint8), labels.astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes: magic 0x08 / ndim, the dims big-endian, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(header + array.tobytes())


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """$DIFFLAB_MNIST_DIR: 400 / 100 synthetic images as IDX files; $DIFFLAB_CACHE: a fresh cache."""
    folder = tmp_path_factory.mktemp("mnist_stand_in")
    for split, n, seed in (("train", NUM_TRAIN, 0), ("t10k", NUM_TEST, 1)):
        images, labels = synthetic_digits(n, seed)
        write_idx(folder / f"{split}-images-idx3-ubyte", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels)
    cache = tmp_path_factory.mktemp("difflab_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFLAB_MNIST_DIR", str(folder))
        patch.setenv("DIFFLAB_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def classifier(stand_in):
    return get_classifier("mnist")


@pytest.fixture(scope="module")
def mnist_test_split(stand_in):
    return get_dataset("mnist", split="test")


def test_stand_in_has_the_mnist_format(mnist_test_split):
    assert mnist_test_split.x.shape == (NUM_TEST, 1, 28, 28) and mnist_test_split.name == "mnist"
    assert -1 <= mnist_test_split.x.min() < mnist_test_split.x.max() <= 1


def test_classifier_trains_at_28x28_and_separates_the_stand_in_classes(classifier, mnist_test_split):
    # the classes differ by where a bright square sits: a working 28×28 classifier gets nearly all
    assert classifier.accuracy(mnist_test_split.x, mnist_test_split.labels) >= 0.9
    features = classifier.features(mnist_test_split.x.reshape(NUM_TEST, 784))  # flat images are accepted too
    assert features.shape == (NUM_TEST, 128) and features.dtype == torch.float32
    with pytest.raises(ShapeError, match=r"\[N, 1, 28, 28\]"):
        classifier.features(torch.zeros(4, 1, 8, 8))


def test_cache_is_safetensors_per_dataset_and_reloads_to_identical_features(classifier, stand_in, mnist_test_split):
    folder = stand_in / "digit_classifier_mnist"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # no pickle, no temp
    record = json.loads((folder / "config.json").read_text())
    assert record["image_size"] == 28 and record["train_images"] == NUM_TRAIN
    train_data = data_fingerprint(get_dataset("mnist", split="train"))
    assert record["train_data"] == train_data
    reloaded = load_digit_classifier(folder, "mnist", train_data)
    assert reloaded is not classifier
    assert torch.equal(reloaded.features(mnist_test_split.x), classifier.features(mnist_test_split.x))
    assert get_classifier("mnist") is classifier  # memoised in process


def test_cached_classifier_of_other_data_or_dataset_is_refused(classifier, stand_in):
    folder = stand_in / "digit_classifier_mnist"
    with pytest.raises(ConfigError, match="trained on data"):
        load_digit_classifier(folder, "mnist", train_data="0" * 16)
    with pytest.raises(ConfigError, match="delete that folder"):
        load_digit_classifier(folder, "digits")  # a 28×28 config is not the digits one
    with pytest.raises(UnknownNameError, match="digits, mnist"):
        get_classifier("cifar10")


def test_frechet_of_a_set_with_itself_is_zero_and_grows_with_a_shift(classifier, mnist_test_split):
    x = mnist_test_split.x
    assert frechet("mnist", x, x) == pytest.approx(0.0, abs=1e-3)  # up to sqrtm's round-off
    assert frechet("mnist", x) == pytest.approx(0.0, abs=1e-3)     # the reference defaults to the test split
    shifted = [frechet("mnist", (x + delta).clamp(-1, 1), x) for delta in (0.1, 0.3, 0.6)]
    assert 0 < shifted[0] < shifted[1] < shifted[2]


def test_frechet_floor_takes_a_fixed_random_subset_of_the_class_sorted_train_split(classifier, stand_in):
    train_x = get_dataset("mnist", split="train").x
    chosen = torch.randperm(NUM_TRAIN, generator=torch.Generator().manual_seed(0))[:100]
    assert frechet_floor("mnist", 100) == frechet("mnist", train_x[chosen])
    assert 0 < frechet_floor("mnist") < frechet("mnist", torch.rand(NUM_TEST, 1, 28, 28) * 2 - 1)
    with pytest.raises(ConfigError, match=f"from 2 to {NUM_TRAIN}"):
        frechet_floor("mnist", NUM_TRAIN + 1)


def test_digits_classifier_keeps_its_layout():
    """The 8×8 net is built as before the generalisation: the same layers under the same names."""
    config = CLASSIFIER_CONFIGS["digits"]
    model = DigitClassifier.from_config(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert shapes == {"body.0.weight": (32, 1, 3, 3), "body.0.bias": (32,), "body.2.weight": (64, 32, 3, 3),
                      "body.2.bias": (64,), "body.6.weight": (128, 1024), "body.6.bias": (128,),
                      "head.1.weight": (10, 128), "head.1.bias": (10,)}


@pytest.mark.slow
def test_real_mnist_classifier_is_accurate_when_the_data_are_cached(tmp_path, monkeypatch):
    if REAL_MNIST is None or not REAL_MNIST.is_file():
        pytest.skip("MNIST is not cached (make data)")
    (tmp_path / REAL_MNIST.name).symlink_to(REAL_MNIST)   # the real data, with a fresh classifier cache
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path))
    monkeypatch.delenv("DIFFLAB_MNIST_DIR", raising=False)
    test = get_dataset("mnist", split="test")
    assert get_classifier("mnist").accuracy(test.x, test.labels) >= 0.97  # a small CNN gets ~98-99% on MNIST
