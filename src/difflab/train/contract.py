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
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

from difflab.core.errors import ConfigError

Fitted = TypeVar("Fitted")


@dataclass(frozen=True)
class Step:
    """One log point of a fit: `step` of `total` optimiser steps done, the mean loss since the last
    record, the learning rate and the seconds since the fit started."""

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
    num_processes / process_index: the data-parallel layout (process 0 writes files).
    """

    model: Fitted
    history: list[tuple[int, float]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    num_processes: int = 1
    process_index: int = 0

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def final_loss(self) -> float | None:
        return self.history[-1][1] if self.history else None


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
        tuples = {f.name for f in dataclasses.fields(cls) if "tuple" in str(f.type)}
        return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in values.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
