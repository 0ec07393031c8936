"""The one shape of every fitting function in difflab (train_denoiser, fit_amed, fit_deft,
distill_guided, distill_progressive):

    result = fit_something(inputs..., config: SomethingConfig, *, out_dir=None, callback=None,
                           progress=True, resume=True) -> FitResult

- the config is a dataclass deriving from `TrainConfig` (the loop's hyper-parameters) that adds the
  method's own fields; it round-trips through JSON (`to_dict` / `from_dict`), its field names are
  the CLI's option names (`train_steps` <-> `--train-steps`) and it is saved beside the result;
- `callback(step: Step)` is called at every log point with one `Step` record;
- the result is a `FitResult`: the fitted object (ready to use and to `save`), the loss history
  and wall-clock timings.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar, Union

from difflab.core.errors import ConfigError

Fitted = TypeVar("Fitted")


@dataclass(frozen=True)
class Step:
    """One log point of a fit: `step` of `total` optimiser steps done, the mean loss since the last
    record, the learning rate of the last update and the seconds since the fit (or its resume) started."""

    step: int
    total: int
    loss: float
    lr: float
    elapsed: float


StepCallback = Callable[[Step], None]


@dataclass
class FitResult(Generic[Fitted]):
    """What every fitting function returns.

    model: the fitted object (the EMA where the method keeps one); history: [(step, mean loss)];
    timings: seconds by phase ("total" always; e.g. "teacher" for AMED's trajectories);
    num_processes / process_index: the data-parallel layout (process 0 writes files);
    raw_model: the trained, un-averaged model where `model` is an EMA (the same object otherwise;
    None where the fitting function does not expose it); metrics: held-out measurements by name (AMED:
    "heldout_error_base", "heldout_error_fitted"; empty where the method takes none); rollbacks: the
    divergences the loop went back from (each time to the state at the log point before, with half the learning
    rate; see `train.loop.fit`'s `rollbacks`), in order; history holds only the steps kept; start_step: the step
    a resumed run began at (0 when it trained from scratch): its timings cover only the steps from there.
    """

    model: Fitted
    history: list[tuple[int, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    num_processes: int = 1
    process_index: int = 0
    raw_model: Any = None
    metrics: dict[str, float] = field(default_factory=dict)
    rollbacks: list[Divergence] = field(default_factory=list)
    start_step: int = 0

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def final_loss(self) -> float | None:
        return self.history[-1][1] if self.history else None


DIVERGENCE_FACTOR = 2.0   # a mean over a log interval this many times the best before it: diverged


@dataclass(frozen=True)
class Divergence:
    """The logged loss rose from `best_loss` (at `best_step`) to `loss` (at `step`)."""

    best_step: int
    best_loss: float
    step: int
    loss: float

    def rise(self) -> str:
        return (f"the loss rose from {self.best_loss:.4g} at step {self.best_step} to {self.loss:.4g} "
                f"at step {self.step}")

    def __str__(self) -> str:
        return (f"{self.rise()}: training diverged; lower the learning rate, or train from a checkpoint before "
                f"step {self.step}")


def loss_divergence(history: list[tuple[int, float]], factor: float = DIVERGENCE_FACTOR) -> Divergence | None:
    """The first log point of history [(step, mean loss)] whose loss is at least `factor` times the lowest
    logged before it, or None. A loss that only falls (however noisily, within `factor`) is no divergence.
    Meaningful where every step draws the same loss (a denoiser's EDM loss); not for AMED's fitting, whose
    steps train different intervals of different scales."""
    best_step, best_loss = None, float("inf")
    for step, loss in history:
        if best_step is not None and loss >= factor * best_loss:
            return Divergence(best_step, best_loss, step, loss)
        if loss < best_loss:
            best_step, best_loss = step, loss
    return None


class JSONConfig:
    """Mixin for config dataclasses: to_dict / from_dict / to_json / from_json, with unknown or
    mistyped keys refused (ConfigError) instead of silently ignored."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; known: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        return cls(**{name: _typed(f"{cls.__name__}.{name}", value, hints[name]) for name, value in values.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def _typed(name: str, value: Any, hint: Any) -> Any:
    """`value` (as JSON gives it) converted to the field type `hint`: ints pass as floats, lists as
    tuples; ConfigError for anything else that does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _typed(name, value, arg)
            except ConfigError:
                pass
    elif (origin or hint) is tuple and isinstance(value, (list, tuple)):
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{name} must have {len(args)} entries, got {value!r}")
        kinds = [args[0]] * len(value) if args[-1:] == (Ellipsis,) else list(args or [Any] * len(value))
        return tuple(_typed(name, v, kind) for v, kind in zip(value, kinds))
    elif hint is float and is_number:
        return float(value)
    elif _fits(value, hint, origin, is_number):
        return value
    raise ConfigError(f"{name} must be {getattr(hint, '__name__', hint)}, got {value!r} ({type(value).__name__})")


def _fits(value: Any, hint: Any, origin: Any, is_number: bool) -> bool:
    """Whether `value` is already of the (non-union, non-tuple, non-float) type `hint`."""
    if hint is Any or (hint is type(None) and value is None):
        return True
    if hint is int:
        return is_number and isinstance(value, int)
    if hint in (str, bool):
        return isinstance(value, hint)
    return (origin or hint) is dict and isinstance(value, dict)
