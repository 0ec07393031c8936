"""The models difflab trains itself: an allow-listed network inside `EDMDenoiser`, and the exact
`GaussianMixture`. Both register with the loader here; the network classes come from `nets`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from difflab.core.errors import ModelFormatError
from difflab.core.mixture import GaussianMixture
from difflab.core.wrappers import EDMDenoiser
from difflab.models.registry import register_kind
from difflab.nets import NETWORKS


def build_network(spec: Any) -> nn.Module:
    """A network from {"class": name, "args": {...}}; only the classes in `nets.NETWORKS` are built."""
    if not isinstance(spec, dict) or spec.get("class") not in NETWORKS:
        name = spec.get("class") if isinstance(spec, dict) else spec
        raise ModelFormatError(f"network class {name!r} is not allowed; known networks: {sorted(NETWORKS)}")
    try:
        return NETWORKS[spec["class"]](**spec.get("args", {}))
    except (TypeError, ValueError) as err:
        raise ModelFormatError(f"cannot build {spec['class']} from the config's arguments: {err}") from err


def load_state(module: nn.Module, tensors: dict[str, Tensor], path: Path) -> None:
    """Load `tensors` into `module` strictly: every key present, none extra, every shape equal."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label}: {keys[:3]}{' …' if len(keys) > 3 else ''}" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if keys)
        raise ModelFormatError(f"the weights in {path} do not match its config.json ({detail})")
    module.load_state_dict(tensors)


def load_edm(config: dict, tensors: dict[str, Tensor], path: Path) -> EDMDenoiser:
    known = {"class", "kind", "convention", "network", "sigma_data", "sigma_min", "sigma_max", "data_shape",
             "difflab_version"}
    denoiser = EDMDenoiser(build_network(config.get("network")), sigma_data=config.get("sigma_data", 0.5),
                           sigma_min=config.get("sigma_min", 0.002), sigma_max=config.get("sigma_max", 80.0),
                           data_shape=config.get("data_shape"),
                           meta={k: v for k, v in config.items() if k not in known})
    load_state(denoiser, tensors, path)
    return denoiser.eval().requires_grad_(False)


def load_mixture(config: dict, tensors: dict[str, Tensor], path: Path) -> GaussianMixture:
    try:
        return GaussianMixture.from_tensors(tensors, config)
    except (KeyError, ValueError) as err:
        raise ModelFormatError(f"{path} is not a valid GaussianMixture ({err})") from err


register_kind("EDMDenoiser", load_edm)
register_kind("GaussianMixture", load_mixture)
