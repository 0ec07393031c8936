"""Model folders on disk -> ready denoisers and add-ons, through a registry.

Each kind of thing difflab saves registers its own loader under the "class" its config.json names
(`register_kind`); foreign layouts (a diffusers folder) register a detector (`register_format`).
This package therefore imports no method package: the methods register themselves when imported
(`import difflab` imports them all).
"""
from difflab.models.addons import check_base_model, fingerprint_of
from difflab.models.networks import build_network, load_state
from difflab.models.registry import info, kind_loader, load, register_format, register_kind, registered_kinds

__all__ = ["build_network", "check_base_model", "fingerprint_of", "info", "kind_loader", "load", "load_state",
           "register_format", "register_kind", "registered_kinds"]
