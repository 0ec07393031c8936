"""difflab.data: built-in sets, the fixed digits split, image folders, HF datasets, get_dataset."""

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.core.errors import ConfigError, ShapeError, UnknownNameError
from difflab.data import (
    DATASET_NAMES,
    Dataset,
    ImageFolder,
    digits_split_indices,
    get_dataset,
    load_digits,
    load_hf_dataset,
    make_gmm,
    make_moons,
    make_rings,
)

HAS_DATASETS = importlib.util.find_spec("datasets") is not None


# ----- digits -------------------------------------------------------------------------------

def test_digits_shapes_range_and_labels():
    train = load_digits("train")
    assert isinstance(train, Dataset)
    assert train.x.shape == (1500, 1, 8, 8) and train.x.dtype == torch.float32
    assert train.shape == (1, 8, 8) and len(train) == 1500
    assert train.x.min() == -1.0 and train.x.max() == 1.0  # 0 and 16 both occur in the raw data
    assert train.labels.dtype == torch.int64 and set(train.labels.tolist()) == set(range(10))
    assert train.num_classes == 10 and train.name == "digits"


def test_digits_scaling_is_x_over_8_minus_1():
    from sklearn.datasets import load_digits as sk_load_digits

    raw = sk_load_digits().images
    all_digits = load_digits("all")
    np.testing.assert_array_equal(all_digits.x[:, 0].numpy(), (raw / 8 - 1).astype(np.float32))


def test_digits_split_sizes_disjoint_and_covering():
    train, test = digits_split_indices("train"), digits_split_indices("test")
    assert len(train) == 1500 and len(test) == 297
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(1797))
    assert len(load_digits("test")) == 297 and len(load_digits("all")) == 1797


def test_digits_split_is_the_documented_permutation():
    permutation = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(digits_split_indices("test").numpy(), permutation[1500:])


def test_digits_returns_copies_the_caller_cannot_corrupt():
    first = load_digits("train")
    first.x.fill_(5.0)
    first.labels.fill_(3)
    again = load_digits("train")
    assert again.x.max() == 1.0 and len(set(again.labels.tolist())) == 10


def test_digits_unknown_split_names_the_choices():
    with pytest.raises(UnknownNameError, match="train, test, all"):
        load_digits("validation")


# ----- 2-D toy sets -------------------------------------------------------------------------

TOY_MAKERS = [make_moons, make_rings, make_gmm]  # make_gmm last: it needs core.mixture


@pytest.mark.parametrize("maker", TOY_MAKERS, ids=lambda m: m.__name__)
def test_toy_shape_dtype_and_determinism(maker):
    data = maker(500, seed=3)
    assert data.x.shape == (500, 2) and data.x.dtype == torch.float32 and data.shape == (2,)
    assert torch.isfinite(data.x).all()
    assert torch.equal(data.x, maker(500, seed=3).x)
    assert not torch.allclose(data.x, maker(500, seed=4).x)


def test_moons_are_centred_with_unit_std():
    x = make_moons(20_000, seed=0).x
    # sampling error of mean/std at n = 20,000 is ~0.01; 0.05 leaves room, a missed scaling does not
    assert x.mean(0).abs().max() < 0.05
    assert (x.std(0) - 1).abs().max() < 0.05


def test_rings_radii_are_the_ring_radii():
    rings = make_rings(3000, seed=0)
    radius = rings.x.norm(dim=1)
    for ring, target in enumerate((0.5, 1.0, 1.5)):
        on_ring = radius[rings.labels == ring]
        assert abs(on_ring.mean() - target) < 0.01  # radial noise 0.05 / sqrt(1000) ~ 0.002
        assert on_ring.std() < 0.07


def test_gmm_samples_lie_on_the_radius_2_circle():
    x = make_gmm(8000, seed=0).x
    angle_bin = torch.round(torch.atan2(x[:, 1], x[:, 0]) / (2 * np.pi / 8)) % 8
    counts = torch.bincount(angle_bin.long(), minlength=8)
    assert abs(x.norm(dim=1).mean() - 2.0) < 0.03  # std 0.2 per coordinate / sqrt(8000)
    assert counts.min() > 850 and counts.max() < 1150  # 1000 each, binomial std ~30


# ----- image folders ------------------------------------------------------------------------

def _write_png(path, value, size=(6, 4), mode="L"):
    """An image of constant `value` (0..255), size (W, H)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * 3).save(path)


def test_image_folder_flat_round_trip(tmp_path):
    _write_png(tmp_path / "a.png", 0)
    _write_png(tmp_path / "b.PNG", 255)
    data = ImageFolder(tmp_path)
    assert data.x.shape == (2, 1, 4, 6) and data.labels is None and data.num_classes == 0
    assert data.x[0].eq(-1).all() and data.x[1].eq(1).all()  # 0 -> -1, 255 -> 1 exactly


def test_image_folder_labels_come_from_sorted_sub_folders(tmp_path):
    _write_png(tmp_path / "zebra" / "1.png", 10)
    _write_png(tmp_path / "ant" / "1.png", 20)
    _write_png(tmp_path / "ant" / "deep" / "2.png", 30)
    data = ImageFolder(tmp_path)
    assert data.class_names == ["ant", "zebra"] and data.num_classes == 2
    assert sorted(data.labels.tolist()) == [0, 0, 1]


def test_image_folder_colour_resize_and_jpeg(tmp_path):
    _write_png(tmp_path / "grey.png", 128)
    Image.new("RGB", (6, 4), (255, 0, 0)).save(tmp_path / "red.jpg", quality=100)
    rgb = ImageFolder(tmp_path, size=3)
    assert rgb.x.shape == (2, 3, 3, 3)  # one colour image makes the inferred channels 3
    assert ImageFolder(tmp_path, size=(2, 5), channels=1).x.shape == (2, 1, 2, 5)
    assert rgb.x.min() >= -1 and rgb.x.max() <= 1


def test_image_folder_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ImageFolder(tmp_path / "nope")


def test_image_folder_without_images(tmp_path):
    (tmp_path / "notes.txt").write_text("no pictures here")
    with pytest.raises(ConfigError, match="No images found"):
        ImageFolder(tmp_path)


def test_image_folder_mixed_sizes_need_size(tmp_path):
    _write_png(tmp_path / "small.png", 0, size=(4, 4))
    _write_png(tmp_path / "big.png", 0, size=(8, 8))
    with pytest.raises(ShapeError, match="Pass size="):
        ImageFolder(tmp_path)
    assert ImageFolder(tmp_path, size=4).x.shape == (2, 1, 4, 4)


def test_image_folder_rejects_loose_images_beside_class_folders(tmp_path):
    _write_png(tmp_path / "loose.png", 0)
    _write_png(tmp_path / "cls" / "inside.png", 0)
    with pytest.raises(ConfigError, match="sub-folder"):
        ImageFolder(tmp_path)


def test_image_folder_bad_channels(tmp_path):
    _write_png(tmp_path / "a.png", 0)
    with pytest.raises(ConfigError, match="channels=4"):
        ImageFolder(tmp_path, channels=4)


# ----- Hugging Face datasets ----------------------------------------------------------------

@pytest.mark.skipif(HAS_DATASETS, reason="`datasets` is installed; the missing-package error cannot occur")
def test_hf_dataset_without_datasets_says_how_to_install(tmp_path):
    (tmp_path / "dataset_info.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"pip install difflab\[hf\]"):
        load_hf_dataset(tmp_path)
    with pytest.raises(ConfigError, match=r"pip install difflab\[hf\]"):
        get_dataset(str(tmp_path))


class _FakeTable:
    """Enough of datasets.Dataset for load_hf_dataset: columns, features, column access."""

    def __init__(self, columns, features):
        self.columns, self.features = columns, features
        self.column_names = list(columns)

    def __getitem__(self, column):
        return self.columns[column]


def test_hf_dataset_conversion_with_a_stand_in_module(tmp_path, monkeypatch):
    images = [Image.new("L", (5, 5), 0), {"bytes": None, "path": str(tmp_path / "w.png")}]
    _write_png(tmp_path / "w.png", 255, size=(5, 5))
    table = _FakeTable({"img": images, "label": [1, 0]}, {"label": types.SimpleNamespace(num_classes=3)})
    fake = types.SimpleNamespace(load_from_disk=lambda path: {"train": table})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    data = load_hf_dataset(tmp_path, image_column="img")
    assert data.x.shape == (2, 1, 5, 5) and data.x[0].eq(-1).all() and data.x[1].eq(1).all()
    assert data.labels.tolist() == [1, 0] and data.num_classes == 3  # "label" found automatically
    with pytest.raises(UnknownNameError, match="img, label"):
        load_hf_dataset(tmp_path)  # default image column "image" is absent
    with pytest.raises(UnknownNameError, match="has train"):
        load_hf_dataset(tmp_path, image_column="img", split="test")


# ----- get_dataset --------------------------------------------------------------------------

def test_get_dataset_names_and_defaults():
    assert len(get_dataset("moons")) == 10_000 and len(get_dataset("rings", n=64)) == 64
    assert len(get_dataset("digits")) == 1500 and len(get_dataset("digits", split="test")) == 297
    assert torch.equal(get_dataset("rings", n=64, seed=1).x, make_rings(64, 1).x)
    subset = get_dataset("digits", n=100, seed=0)
    assert len(subset) == 100 and torch.equal(subset.x, get_dataset("digits", n=100, seed=0).x)
    assert len(get_dataset("gmm", n=32)) == 32


def test_get_dataset_reads_an_image_folder(tmp_path):
    _write_png(tmp_path / "c0" / "a.png", 0)
    _write_png(tmp_path / "c1" / "b.png", 255)
    data = get_dataset(tmp_path)
    assert data.shape == (1, 4, 6) and data.labels.tolist() == [0, 1]


def test_get_dataset_unknown_name_lists_the_names():
    with pytest.raises(UnknownNameError) as error:
        get_dataset("mnist-not-here")
    for name in DATASET_NAMES:
        assert name in str(error.value)
    assert "mnist-not-here" in str(error.value)


def test_get_dataset_too_many_samples():
    with pytest.raises(ConfigError, match="n=2000"):
        get_dataset("digits", n=2000)


def test_dataset_validates_its_fields():
    with pytest.raises(ShapeError, match="float32"):
        Dataset(torch.zeros(3, 2, dtype=torch.float64), None, "bad", 0)
    with pytest.raises(ShapeError, match="num_classes=2"):
        Dataset(torch.zeros(3, 2), torch.tensor([0, 1, 2]), "bad", 2)


@pytest.mark.parametrize("name", ["", "  "])
@pytest.mark.reliability("cli input")
def test_an_empty_data_set_name_is_refused_not_read_as_the_current_folder(name, tmp_path, monkeypatch):
    Image.new("L", (8, 8)).save(tmp_path / "stray.png")      # an image folder would load without the check
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="empty"):
        get_dataset(name)
