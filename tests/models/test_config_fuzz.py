"""Property-based fuzzing of config.json (hypothesis): whatever a model folder's config holds, `load`
either returns a model or raises one `DifflabError` whose message is a single line — never another
exception, never an allocation beyond the weights file's own tensors."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import difflab
from difflab.core.errors import DifflabError
from difflab.core.wrappers import EDMDenoiser
from difflab.nets import MLP, UNet

pytestmark = pytest.mark.reliability("configs")

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    EDMDenoiser(MLP(dim=2, hidden=8, depth=1, embed_dim=8), data_shape=(2,)).save(root / "mlp")
    EDMDenoiser(UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=()),
                data_shape=(1, 8, 8)).save(root / "unet")
    return root


def _paths(config: dict, prefix=()):
    for key, value in config.items():
        yield (*prefix, key)
        if isinstance(value, dict):
            yield from _paths(value, (*prefix, key))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["mlp", "unet"]), data=st.data(), value=JSON_VALUES)
def test_any_config_value_loads_or_is_a_one_line_error(saved, tmp_path_factory, which, data, value):
    config = json.loads((saved / which / "config.json").read_text())
    path = data.draw(st.sampled_from(sorted(_paths(config))))
    target = config
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    folder = tmp_path_factory.mktemp("case")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((saved / which / "model.safetensors").read_bytes())
    try:
        difflab.load(folder)
    except DifflabError as err:
        assert "\n" not in str(err).strip(), str(err)
