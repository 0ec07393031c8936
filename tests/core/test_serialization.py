"""Model folders: GaussianMixture round trip, atomic writes, and a specific ModelFormatError for
each way a folder can be wrong (never unpickling)."""
from __future__ import annotations

import json

import pytest
import torch

import difflab
from difflab import GaussianMixture
from difflab.core import serialization
from difflab.core.errors import ModelFormatError


def _x(rng, n=7, shape=(2,)):
    return torch.as_tensor(3 * rng.standard_normal((n, *shape)), dtype=torch.float64)


def test_mixture_save_load_round_trip_gives_same_log_prob_and_denoiser(mix2d, tmp_path, rng):
    saved = mix2d.model.save(tmp_path / "gm")
    loaded = difflab.load(saved)
    assert isinstance(loaded, GaussianMixture)
    x, sigma = _x(rng), torch.linspace(0.1, 3.0, 7, dtype=torch.float64)
    labels = torch.tensor([0, 1, -1, 1, 0, -1, 1])
    # covariances are stored full and re-diagonalised on load: float64 round-off only
    for sigma_lp in (0.0, 0.5):
        torch.testing.assert_close(loaded.log_prob(x, sigma_lp), mix2d.model.log_prob(x, sigma_lp), rtol=0, atol=1e-12)
    torch.testing.assert_close(loaded(x, sigma), mix2d.model(x, sigma), rtol=0, atol=1e-12)
    torch.testing.assert_close(loaded(x, sigma, class_labels=labels), mix2d.model(x, sigma, class_labels=labels),
                               rtol=0, atol=1e-12)
    config = json.loads((saved / "config.json").read_text())
    assert config["class"] == "GaussianMixture" and config["difflab_version"] == difflab.__version__
    assert config["num_classes"] == 2


def test_image_shaped_mixture_round_trip_keeps_data_shape(tmp_path, rng):
    model = GaussianMixture(rng.standard_normal((2, 4)), stds=[0.5, 1.0], weights=[1, 3], data_shape=(1, 2, 2))
    loaded = difflab.load(model.save(tmp_path / "img"))
    assert loaded.data_shape == (1, 2, 2)
    x = _x(rng, shape=(1, 2, 2))
    torch.testing.assert_close(loaded(x, torch.ones(7, dtype=torch.float64)),
                               model(x, torch.ones(7, dtype=torch.float64)), rtol=0, atol=1e-12)


def test_save_over_existing_folder_needs_overwrite(mix2d, mix1d, tmp_path, rng):
    path = mix2d.model.save(tmp_path / "gm")
    with pytest.raises(FileExistsError, match="overwrite"):
        mix1d.model.save(path)
    assert difflab.load(path).dim == 2                      # untouched
    mix1d.model.save(path, overwrite=True)
    x = _x(rng, shape=(1,))
    torch.testing.assert_close(difflab.load(path).log_prob(x), mix1d.model.log_prob(x), rtol=0, atol=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gm"]  # no temporary or .old folder left


# ----- every way a folder can be wrong -> ModelFormatError naming the problem ---------------------
def _missing(path, model):
    return path / "does-not-exist"


def _no_config(path, model):
    model.save(path)
    (path / "config.json").unlink()
    return path


def _bad_json(path, model):
    model.save(path)
    (path / "config.json").write_text('{"class": "GaussianMixture", ')
    return path


def _unknown_class(path, model):
    model.save(path)
    (path / "config.json").write_text(json.dumps({"class": "EvilNet", "data_shape": [2]}))
    return path


def _truncated_weights(path, model):
    model.save(path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return path


def _pickle_only(path, model):
    path.mkdir()
    torch.save(model.tensors(), path / "model.pt")
    return path


def _pickle_beside_config(path, model):
    model.save(path)
    (path / "model.safetensors").unlink()
    torch.save(model.tensors(), path / "model.pt")
    return path


def _weights_missing(path, model):
    model.save(path)
    (path / "model.safetensors").unlink()
    return path


def _wrong_tensors(path, model):
    model.save(path)
    from safetensors.torch import save_file
    save_file({"means": model.means}, path / "model.safetensors")  # no covs / weights / labels
    return path


def _config_not_object(path, model):
    model.save(path)
    (path / "config.json").write_text("[1, 2, 3]")
    return path


@pytest.mark.parametrize("make, keyword", [
    (_missing, "no model folder"),
    (_no_config, "config.json is missing"),
    (_bad_json, "not valid JSON"),
    (_unknown_class, "'EvilNet'"),
    (_truncated_weights, "truncated"),
    (_pickle_only, "pickle"),
    (_pickle_beside_config, "pickle"),
    (_weights_missing, "model.safetensors is missing"),
    (_wrong_tensors, "not a valid GaussianMixture"),
    (_config_not_object, "JSON object"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_load_of_a_bad_folder_raises_model_format_error_naming_the_problem(make, keyword, mix2d, tmp_path):
    path = make(tmp_path / "model", mix2d.model)
    with pytest.raises(ModelFormatError, match=keyword):
        difflab.load(path)


def test_load_of_a_pickle_file_path_is_refused_without_unpickling(mix2d, tmp_path, monkeypatch):
    file = tmp_path / "model.pt"
    torch.save(mix2d.model.tensors(), file)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    with pytest.raises(ModelFormatError, match="never unpickles"):
        difflab.load(file)


# ----- atomic writes ------------------------------------------------------------------------------
class _Crash(RuntimeError):
    pass


def _crash_mid_write(tensors, filename, metadata=None):
    with open(filename, "wb") as f:  # leave a half-written file behind, as a crash would
        f.write(b"\x00" * 64)
    raise _Crash("disk full")


def test_failed_save_leaves_no_partial_folder(mix2d, tmp_path, monkeypatch):
    parent = tmp_path / "models"
    parent.mkdir()
    (parent / "other").mkdir()
    before = sorted(p.name for p in parent.iterdir())
    monkeypatch.setattr(serialization, "save_file", _crash_mid_write)
    with pytest.raises(_Crash):
        mix2d.model.save(parent / "gm")
    assert sorted(p.name for p in parent.iterdir()) == before


def test_failed_overwrite_keeps_the_old_model(mix2d, mix1d, tmp_path, monkeypatch, rng):
    path = mix2d.model.save(tmp_path / "gm")
    monkeypatch.setattr(serialization, "save_file", _crash_mid_write)
    with pytest.raises(_Crash):
        mix1d.model.save(path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gm"]
    x = _x(rng)
    torch.testing.assert_close(difflab.load(path).log_prob(x), mix2d.model.log_prob(x), rtol=0, atol=1e-12)
