"""The models difflab trains itself: an allow-listed network inside `EDMDenoiser`, and the exact
`GaussianMixture`. Both register with the loader here; the network classes come from `nets`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from difflab.core.errors import ModelFormatError
from difflab.core.mixture import GaussianMixture
from difflab.core.wrappers import EDMDenoiser
from difflab.models.registry import register_kind
from difflab.nets import NETWORKS


def build_network(spec: Any) -> nn.Module:
    """A network from {"class": name, "args": {...}}; only the classes in `nets.NETWORKS` are built."""
    name = spec.get("class") if isinstance(spec, dict) else spec
    if not isinstance(name, str) or name not in NETWORKS:
        raise ModelFormatError(f"network class {name!r} is not allowed; known networks: {sorted(NETWORKS)}")
    args = spec.get("args", {})
    if not isinstance(args, dict):
        raise ModelFormatError(f"the {name} arguments in config.json must be a JSON object, got {args!r}")
    too_big = [key for key, value in _numbers(args) if abs(value) > MAX_NETWORK_SIZE]
    if too_big:
        raise ModelFormatError(f"{name} argument(s) {too_big} exceed {MAX_NETWORK_SIZE:,}: not a network difflab "
                               "builds (a corrupt or hostile config.json?)")
    try:
        return NETWORKS[name](**args)
    except Exception as err:   # whatever a constructor raises on arguments it cannot take, the config is at fault
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFormatError(f"cannot build {name} from the config's arguments: {message}") from err


MAX_NETWORK_SIZE = 2**16   # widths, depths, class counts: far above any network here, and built in seconds


def _numbers(value: Any, key: str = "") -> list[tuple[str, float]]:
    """Every number inside a JSON value, with the key that holds it."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [(key, value)]
    if isinstance(value, dict):
        return [pair for k, v in value.items() for pair in _numbers(v, str(k))]
    if isinstance(value, list):
        return [pair for v in value for pair in _numbers(v, key)]
    return []


def load_state(module: nn.Module, tensors: dict[str, Tensor], path: Path, assign: bool = False) -> None:
    """Load `tensors` into `module` strictly: every key present, none extra, every shape equal."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label}: {keys[:3]}{' …' if len(keys) > 3 else ''}" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if keys)
        raise ModelFormatError(f"the weights in {path} do not match its config.json ({detail})")
    module.load_state_dict(tensors, assign=assign)


def build_checked(factory: Callable[[], nn.Module], tensors: dict[str, Tensor], path: Path) -> nn.Module:
    """factory() with `tensors` loaded, after checking on the meta device (no memory) that the config
    builds exactly the shapes the weights file holds: a config.json asking for a huge network is
    refused before anything is allocated."""
    with torch.device("meta"):
        load_state(factory(), tensors, path, assign=True)
    module = factory()
    load_state(module, tensors, path)
    return module


def load_edm(config: dict, tensors: dict[str, Tensor], path: Path) -> EDMDenoiser:
    known = {"class", "kind", "convention", "network", "sigma_data", "sigma_min", "sigma_max", "data_shape",
             "difflab_version"}
    _check_edm_config(config, path)

    def factory() -> EDMDenoiser:
        return EDMDenoiser(build_network(config.get("network")), sigma_data=config.get("sigma_data", 0.5),
                           sigma_min=config.get("sigma_min", 0.002), sigma_max=config.get("sigma_max", 80.0),
                           data_shape=config.get("data_shape"),
                           meta={k: v for k, v in config.items() if k not in known})

    return build_checked(factory, tensors, path).eval().requires_grad_(False)


def _check_edm_config(config: dict, path: Path) -> None:
    """The scalar fields of an EDM model's config, with a one-line error for each way they can be wrong."""
    for key in ("sigma_data", "sigma_min", "sigma_max"):
        value = config.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ModelFormatError(f"{path}/config.json: {key} must be a finite number > 0, got {value!r}")
    shape = config.get("data_shape")
    if shape is not None and (not isinstance(shape, list) or not 1 <= len(shape) <= 4 or
                              not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 2**16
                                      for d in shape)):
        raise ModelFormatError(f"{path}/config.json: data_shape must be a list of 1-4 positive sizes "
                               f"(e.g. [1, 28, 28]), got {shape!r}")


def load_mixture(config: dict, tensors: dict[str, Tensor], path: Path) -> GaussianMixture:
    try:
        return GaussianMixture.from_tensors(tensors, config)
    except (KeyError, ValueError) as err:
        raise ModelFormatError(f"{path} is not a valid GaussianMixture ({err})") from err


register_kind("EDMDenoiser", load_edm)
register_kind("GaussianMixture", load_mixture)
