"""The on-the-spot digit classifier: accuracy, the safetensors cache, and the Fréchet floor."""

import json

import pytest
import torch

from difflab.core.errors import ConfigError, ShapeError
from difflab.data import load_digits
from difflab.metrics import digits_frechet, digits_frechet_floor, get_digit_classifier
from difflab.metrics.digit_classifier import load_digit_classifier


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    """A fresh cache, named through $DIFFLAB_CACHE, so the classifier is trained once per session."""
    root = tmp_path_factory.mktemp("difflab_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFLAB_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def classifier(cache_root):
    return get_digit_classifier()


@pytest.fixture(scope="session")
def held_out_digits():
    return load_digits("test")


def test_classifier_held_out_accuracy_is_at_least_95_percent(classifier, held_out_digits):
    assert classifier.accuracy(held_out_digits.x, held_out_digits.labels) >= 0.95


def test_features_and_probabilities_have_the_documented_shapes(classifier, held_out_digits):
    features = classifier.features(held_out_digits.x)
    probs = classifier.class_probs(held_out_digits.x.reshape(-1, 64))  # flat images are accepted too
    assert features.shape == (297, 128) and features.dtype == torch.float32
    assert probs.shape == (297, 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(297))
    with pytest.raises(ShapeError, match=r"\[N, 1, 8, 8\]"):
        classifier.features(torch.zeros(4, 3, 8, 8))


def test_cache_holds_safetensors_and_reloads_to_identical_features(classifier, cache_root, held_out_digits):
    folder = cache_root / "digit_classifier"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    config = json.loads((folder / "config.json").read_text())
    assert config["test_accuracy"] >= 0.95
    reloaded = load_digit_classifier(folder)
    assert reloaded is not classifier
    assert torch.equal(reloaded.features(held_out_digits.x), classifier.features(held_out_digits.x))


def test_classifier_is_memoised_in_process(classifier, cache_root):
    assert get_digit_classifier() is classifier
    assert get_digit_classifier(cache_root) is classifier  # same folder, named explicitly


def test_corrupt_cache_gives_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="delete that folder"):
        load_digit_classifier(tmp_path)


def test_frechet_floor_is_positive_and_small_against_noise(classifier, held_out_digits):
    floor = digits_frechet_floor()
    noise = torch.rand(297, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise_distance = digits_frechet(noise, held_out_digits.x)
    # real vs real at n = 297 scores ~20 here (finite-sample bias), uniform noise ~300–500
    assert 0 < floor < 0.2 * noise_distance
    assert digits_frechet(held_out_digits.x) == pytest.approx(0.0, abs=1e-3)  # reference: the test split


def test_frechet_floor_is_real_training_digits_against_the_test_split(classifier, held_out_digits):
    train_x = load_digits("train").x
    assert digits_frechet_floor(100) == digits_frechet(train_x[:100], held_out_digits.x)
    # more real samples, less finite-sample bias: the floor falls with n
    assert digits_frechet_floor(1500) < digits_frechet_floor() < digits_frechet_floor(50)


def test_frechet_floor_rejects_n_beyond_the_train_split(classifier):
    with pytest.raises(ConfigError, match="from 2 to 1500"):
        digits_frechet_floor(1501)
