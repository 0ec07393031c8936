"""The one check every add-on makes: was it fitted for this base model?"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from difflab.core.errors import AddonMismatchError
from difflab.core.fingerprint import fingerprint
from difflab.models.registry import load


def fingerprint_of(model: Any) -> str | None:
    """The fingerprint of a denoiser, of a model folder (loaded first), or a fingerprint string itself."""
    if isinstance(model, str) and not Path(model).exists():
        return model
    if isinstance(model, (str, Path)):
        model = load(model)
    return fingerprint(model)


def check_base_model(addon: str, recorded: str | None, given: Any, fix: str) -> None:
    """AddonMismatchError unless `given` (denoiser, folder or fingerprint) is the base `recorded`.

    addon: what is checked ("AMED predictor"); fix: how to get a matching one. Nothing is checked
    when the add-on records no base or the given model has no identity (a plain function).
    """
    if recorded is None or given is None:
        return
    given_id = fingerprint_of(given)
    if given_id is not None and given_id != recorded:
        raise AddonMismatchError(f"this {addon} was fitted for base model {recorded[:12]}…, not for the given "
                                 f"model {given_id[:12]}…; {fix}")
