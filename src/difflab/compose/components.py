"""What SuperDiff composes: M denoisers, or one conditional denoiser under M conditions (classes, prompts).

`Components.evaluate(x, σ)` returns every model's ε̂_i(x; σ) as one [M, N, ...] tensor (plus the
unconditional ε̂_u when classifier-free guidance is on, and J_i·z for a divergence probe z). One
conditional denoiser under M conditions is evaluated in ONE batched call on M·N (+N for CFG) rows;
separate denoisers cost one call each.

Classifier-free guidance (docs/methods/superdiff.md (13)): the densities tracked are those of the unguided
conditionals ε̂_i; the guided field ε̂_u + (1 + w)(Σκ_i ε̂_i − ε̂_u) only moves x.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from difflab.core.denoiser import eps, sigma_batch
from difflab.core.errors import ConfigError, ShapeError, UnknownNameError
from difflab.core.wrappers import null_condition

DIVERGENCE_MODES = ("auto", "jvp", "vjp")


@dataclass
class Evaluation:
    """One evaluation of the components at (x, σ).

    eps: [M, N, ...] unguided ε̂_i; eps_uncond: [N, ...] or None (no guidance);
    jvp: [M, N, ...] J_i·z (or z·J_i, see `Components.divergence`) for the probe z, or None.
    """

    eps: Tensor
    eps_uncond: Tensor | None = None
    jvp: Tensor | None = None


class Components:
    """M models to compose. Use `over_models`, `over_conditions` or `over_prompts` rather than this constructor.

    denoisers: M denoisers (the same object M times for one model under several conditions);
    conds: M dicts of condition keyword arguments; w: classifier-free guidance weight
    (D_w = D_u + (1+w)(D_c − D_u), None: no guidance) with `uncond` the null condition;
    divergence: how J·z is computed for the ODE form: "jvp" (torch.func forward mode), "vjp"
    (torch.autograd reverse mode, zᵀJ: same Hutchinson estimate), "auto" (jvp, falling back to vjp
    for a denoiser torch.func cannot trace).
    """

    def __init__(self, denoisers: Sequence[Any], conds: Sequence[dict] | None = None, w: float | None = None,
                 uncond: dict | None = None, divergence: str = "auto"):
        denoisers = list(denoisers)
        conds = [dict(c) for c in conds] if conds is not None else [{} for _ in denoisers]
        if not denoisers:
            raise ConfigError("nothing to compose: give at least one model")
        if len(conds) != len(denoisers):
            raise ConfigError(f"{len(denoisers)} models but {len(conds)} condition dicts; give one per model")
        if divergence not in DIVERGENCE_MODES:
            raise UnknownNameError(f"unknown divergence mode {divergence!r}; choose one of {list(DIVERGENCE_MODES)}")
        single = all(d is denoisers[0] for d in denoisers)
        if w is not None and not single:
            raise ConfigError("classifier-free guidance (w) composes one conditional model under several "
                              "conditions; use over_conditions(denoiser, conds, w=...)")
        self.denoisers, self.conds, self.w, self.divergence = denoisers, conds, w, divergence
        self.uncond = (uncond if uncond is not None else _null(conds[0])) if w is not None else None
        self.batched = single and _concatenable(conds + ([self.uncond] if self.uncond is not None else []))

    @classmethod
    def over_models(cls, denoisers: Sequence[Any], conds: Sequence[dict] | dict | None = None,
                    divergence: str = "auto") -> "Components":
        """M separate denoisers (e.g. trained on different data); `conds`: one dict for all or one per model."""
        denoisers = list(denoisers)
        if isinstance(conds, dict):
            conds = [conds] * len(denoisers)
        return cls(denoisers, conds, divergence=divergence)

    @classmethod
    def over_conditions(cls, denoiser: Any, conds: Sequence[dict], w: float | None = None,
                        uncond: dict | None = None, divergence: str = "auto") -> "Components":
        """One conditional denoiser under M conditions (class labels, text embeddings...), one batched call.

        conds: M dicts, e.g. [{"class_labels": 3}, {"class_labels": 8}] or
        [{"encoder_hidden_states": e1}, {"encoder_hidden_states": e2}]; a tensor value is [N, ...] or
        [1, ...] (broadcast over the batch); an int class label is broadcast too.
        w: guidance weight (None: unguided); uncond: the null condition (default: class labels −1).
        """
        if len(conds) < 1:
            raise ConfigError("over_conditions needs at least one condition")
        return cls([denoiser] * len(conds), conds, w=w, uncond=uncond, divergence=divergence)

    @classmethod
    def over_prompts(cls, model: Any, prompts: Sequence[str], w: float | None = None, negative_prompt: str = "",
                     divergence: str = "auto") -> "Components":
        """One text-to-image model under M prompts: `over_conditions` on their text embeddings, one batched call.

        model: a denoiser with `encode_prompts(list[str]) -> [P, tokens, dim]` (a Stable Diffusion folder
        loaded with `difflab.load`); each prompt's condition is `encoder_hidden_states` [1, tokens, dim],
        broadcast over the batch. w: guidance weight (None: unguided), whose null condition is the
        `negative_prompt`'s embedding ("" by default, as diffusers).
        """
        encode = getattr(model, "encode_prompts", None)
        if not callable(encode):
            raise ConfigError(f"{type(model).__name__} takes no text prompts; over_prompts needs a text-to-image "
                              "model with `encode_prompts` (a Stable Diffusion folder loaded with difflab.load)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in [*prompts, negative_prompt]):
            raise ConfigError(f"over_prompts needs a list of prompt strings and a string negative_prompt, got "
                              f"{prompts!r} and {negative_prompt!r}")
        if negative_prompt and w is None:
            raise ConfigError("negative_prompt is the null condition of classifier-free guidance: give w too")
        embeddings = encode([*prompts, negative_prompt] if w is not None else prompts)   # [M (+1), tokens, dim]
        conds = [{"encoder_hidden_states": embeddings[i:i + 1]} for i in range(len(prompts))]
        uncond = {"encoder_hidden_states": embeddings[-1:]} if w is not None else None
        return cls.over_conditions(model, conds, w=w, uncond=uncond, divergence=divergence)

    @property
    def num_models(self) -> int:
        return len(self.denoisers)

    @property
    def sigma_range(self) -> tuple[float | None, float | None]:
        """The σ range every component accepts: (largest sigma_min, smallest sigma_max)."""
        lows = [getattr(d, "sigma_min", None) for d in self.denoisers]
        highs = [getattr(d, "sigma_max", None) for d in self.denoisers]
        lows, highs = [v for v in lows if v is not None], [v for v in highs if v is not None]
        return (max(lows) if lows else None, min(highs) if highs else None)

    @property
    def sigma_min(self) -> float | None:
        return self.sigma_range[0]

    @property
    def sigma_max(self) -> float | None:
        return self.sigma_range[1]

    def check_shape(self, x: Tensor) -> None:
        for i, d in enumerate(self.denoisers):
            shape = getattr(d, "data_shape", None)
            if shape is not None and tuple(x.shape[1:]) != tuple(shape):
                raise ShapeError(f"x has per-sample shape {tuple(x.shape[1:])}, model {i} expects {tuple(shape)}")

    # ----- evaluation ----------------------------------------------------------------------
    def evaluate(self, x: Tensor, sigma: float, probe: Tensor | None = None) -> Evaluation:
        """ε̂_i(x; σ) for all i (and ε̂_u with guidance); with a probe z also J_i·z. x: [N, ...]."""
        n = x.shape[0]
        conds = [_expand(c, n, x.device) for c in self.conds]
        if self.batched:
            blocks = conds + ([_expand(self.uncond, n, x.device)] if self.uncond is not None else [])
            big_cond = {k: (torch.cat([c[k] for c in blocks]) if torch.is_tensor(blocks[0][k]) else blocks[0][k])
                        for k in blocks[0]}
            x_big = x.repeat(len(blocks), *([1] * (x.ndim - 1)))
            probe_big = None
            if probe is not None:   # the unconditional block's density is not tracked: zero tangent
                probe_big = torch.cat([probe.repeat(len(conds), *([1] * (x.ndim - 1))),
                                       torch.zeros_like(x).repeat(len(blocks) - len(conds), *([1] * (x.ndim - 1)))])
            out, tangent = self._call(self.denoisers[0], x_big, sigma, big_cond, probe_big)
            out = out.reshape(len(blocks), *x.shape)
            eps_models, eps_uncond = out[:len(conds)], (out[len(conds)] if self.uncond is not None else None)
            jvp = None if tangent is None else tangent.reshape(len(blocks), *x.shape)[:len(conds)]
            return Evaluation(eps_models, eps_uncond, jvp)
        results = [self._call(d, x, sigma, c, probe) for d, c in zip(self.denoisers, conds)]
        eps_uncond = None
        if self.uncond is not None:
            eps_uncond = self._call(self.denoisers[0], x, sigma, _expand(self.uncond, n, x.device), None)[0]
        jvp = None if probe is None else torch.stack([r[1] for r in results])
        return Evaluation(torch.stack([r[0] for r in results]), eps_uncond, jvp)

    def _call(self, denoiser, x: Tensor, sigma: float, cond: dict, probe: Tensor | None):
        """(ε̂, J·z or None) of one denoiser call; J·z by forward mode, or zᵀJ by reverse mode."""
        sigma_vec = sigma_batch(sigma, x)

        def eps_of(y: Tensor) -> Tensor:
            return eps(denoiser, y, sigma_vec, **cond)

        if probe is None:
            return eps_of(x), None
        if self.divergence in ("auto", "jvp"):
            try:
                out, tangent = torch.func.jvp(eps_of, (x,), (probe,))
                return out, tangent
            except (RuntimeError, NotImplementedError, TypeError):
                if self.divergence == "jvp":
                    raise
                self.divergence = "vjp"   # remember: this denoiser is not functorch-friendly
        return _vjp(eps_of, x, probe)


def _vjp(fn: Callable[[Tensor], Tensor], x: Tensor, probe: Tensor) -> tuple[Tensor, Tensor]:
    """(fn(x), zᵀ·∂fn/∂x) by reverse mode; zᵀJz = (Jᵀz)·z gives the same Hutchinson estimate."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        out = fn(leaf)
        (grad,) = torch.autograd.grad(out, leaf, grad_outputs=probe)
    return out.detach(), grad.detach()


def _null(cond: dict) -> dict:
    """The default unconditional input for guidance: class labels (int or tensor) set to −1."""
    if isinstance(cond.get("class_labels"), int):
        return {**cond, "class_labels": -1}
    return null_condition(cond)


def _expand(cond: dict, n: int, device) -> dict:
    """Condition values broadcast to the batch: [1, ...] tensors and int class labels become [n, ...]."""
    out = {}
    for key, value in cond.items():
        if isinstance(value, int) and key == "class_labels":
            value = torch.full((n,), value, dtype=torch.long)
        if torch.is_tensor(value):
            if value.ndim == 0:
                value = value.expand(n)
            elif value.shape[0] == 1 and n != 1:
                value = value.expand(n, *value.shape[1:])
            elif value.shape[0] != n:
                raise ShapeError(f"condition {key!r} has batch size {value.shape[0]}, expected {n} or 1")
            value = value.to(device)
        out[key] = value
    return out


def _concatenable(conds: list[dict]) -> bool:
    """Whether conditions can share one batched call: the same keys; tensors, or equal plain values."""
    keys = set(conds[0])
    for c in conds[1:]:
        if set(c) != keys:
            return False
        for k in keys:
            a, b = conds[0][k], c[k]
            if torch.is_tensor(a) or torch.is_tensor(b) or (isinstance(a, int) and k == "class_labels"):
                continue
            if a is not b and a != b:
                return False
    return True
