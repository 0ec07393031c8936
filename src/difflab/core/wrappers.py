"""Wrappers that turn a network trained in some convention into a σ-space denoiser.

| network predicts                   | wrapper           |
|------------------------------------|-------------------|
| F with EDM preconditioning         | `EDMDenoiser`     |
| ε, v or x0 on a discrete ᾱ table   | `VPDenoiser`      |
| rectified-flow velocity            | `FlowDenoiser`    |
| a denoiser, guided                 | `CFGDenoiser`     |

No algorithm special-cases a convention: each is converted here, once.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from difflab.core.denoiser import append_dims, call_network
from difflab.core.errors import ConfigError, SigmaRangeError
from difflab.core.serialization import SavedModel

NetFn = Callable[..., Tensor]


class EDMDenoiser(SavedModel, nn.Module):
    """D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise) (Karras et al. 2022, Table 1, "EDM" column).

    net: F(x, c_noise, **cond) -> [B, ...]. The network's `bottleneck` attribute, if any, is
    exposed as `last_feature`.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 data_shape: Sequence[int] | None = None, meta: dict | None = None):
        super().__init__()
        self.net, self.sigma_data = net, sigma_data
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.data_shape = None if data_shape is None else tuple(data_shape)
        self.meta = dict(meta or {})  # dataset name, num_classes...: carried into config.json

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        s = append_dims(sigma, x.ndim).to(x.dtype)
        c_skip = self.sigma_data**2 / (s**2 + self.sigma_data**2)
        c_out = s * self.sigma_data / (s**2 + self.sigma_data**2).sqrt()
        c_in = 1 / (s**2 + self.sigma_data**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip * x + c_out * call_network(self.net, c_in * x, c_noise, **cond)

    @property
    def last_feature(self) -> Tensor | None:
        return getattr(self.net, "bottleneck", None)

    def config(self) -> dict:
        """Everything needed to rebuild this denoiser, JSON-serialisable (weights aside)."""
        return {"class": "EDMDenoiser", "kind": "denoiser", "convention": "edm",
                "network": {"class": type(self.net).__name__, "args": self.net.config},
                "sigma_data": self.sigma_data, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "data_shape": None if self.data_shape is None else list(self.data_shape), **self.meta}


def vp_scale(sigma: Tensor | float, ndim: int | None = None) -> Tensor:
    """α = 1/sqrt(1 + σ²): x_vp = α·x_σ is the variance-preserving state at the same noise level.

    sigma: a float or [B]; with ndim, shaped [B, 1, ..., 1] to broadcast against a [B, ...] state.
    """
    sigma = sigma if torch.is_tensor(sigma) else torch.tensor(float(sigma), dtype=torch.float64)
    alpha = 1 / (1 + sigma**2).sqrt()
    return alpha if ndim is None else append_dims(alpha.reshape(-1), ndim)


def vp_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) for each discrete timestep t (increasing in t)."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation like numpy.interp; xp increasing, x inside [xp0, xp-1]."""
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x_lo, x_hi, f_lo, f_hi = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    return f_lo + (x - x_lo) / (x_hi - x_lo) * (f_hi - f_lo)


class VPDenoiser(nn.Module):
    """A discrete-time variance-preserving model (diffusers DDPM / Stable Diffusion style).

    model(x_vp, t, **cond) -> ε, v or x0 prediction, with t a fractional timestep [B] obtained by
    interpolating log σ in the model's table σ_t = sqrt((1 − ᾱ_t)/ᾱ_t). With α = 1/sqrt(1+σ²),
    s = σ/sqrt(1+σ²): x_vp = α·x_σ, and
      ε-prediction: D = x − σ·ε̂;  v-prediction: D = α·x_vp − s·v̂;  sample: D = x̂0.
    alphas_cumprod: [T] (ᾱ decreasing in t).
    """

    PREDICTIONS = ("epsilon", "v_prediction", "sample")

    def __init__(self, model: NetFn, alphas_cumprod: Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in self.PREDICTIONS:
            raise ConfigError(f"prediction_type must be one of {self.PREDICTIONS}, got {prediction_type!r}")
        self.model, self.prediction_type = model, prediction_type
        self.register_buffer("log_sigmas", vp_sigmas(alphas_cumprod.double()).log(), persistent=False)
        self.sigma_min = float(self.log_sigmas[0].exp())
        self.sigma_max = float(self.log_sigmas[-1].exp())
        self.data_shape: tuple[int, ...] | None = None  # set by loaders that know it

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep whose table σ equals `sigma` (linear in log σ between entries)."""
        log_sigma = sigma.double().log()
        lo, hi = self.log_sigmas[0], self.log_sigmas[-1]
        tol = 1e-4  # float32 round-off at the ends of the table
        if bool(((log_sigma < lo - tol) | (log_sigma > hi + tol)).any()):
            raise SigmaRangeError(
                f"sigma in [{float(sigma.min()):.4g}, {float(sigma.max()):.4g}] is outside this VP model's "
                f"range [{self.sigma_min:.4g}, {self.sigma_max:.4g}]; build the grid inside it "
                "(get_sigmas(..., sigma_min=model.sigma_min, sigma_max=model.sigma_max))"
            )
        steps = torch.arange(len(self.log_sigmas), dtype=torch.float64, device=sigma.device)
        return interp(log_sigma.clamp(lo, hi), self.log_sigmas, steps)

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        s = append_dims(sigma, x.ndim).to(x.dtype)
        alpha = vp_scale(s)
        x_vp = alpha * x
        return self.denoised(x, s, call_network(self.model, x_vp, self.sigma_to_t(sigma).to(x.dtype), **cond))

    def denoised(self, x: Tensor, sigma: Tensor | float, out: Tensor) -> Tensor:
        """D(x; σ) from the network's output `out` at x_vp = α·x (the class docstring's conversions).

        x, out: [B, ...]; sigma: a float or [B, 1, ..., 1]. DifflabScheduler calls this with the output a
        pipeline computed, so the conversion is written once.
        """
        if self.prediction_type == "epsilon":
            return x - sigma * out                                  # D = x − σ·ε̂
        if self.prediction_type == "v_prediction":
            alpha = vp_scale(sigma)
            return alpha**2 * x - alpha * sigma * out              # D = α·x_vp − s·v̂, s = σ·α
        return out

    @property
    def last_feature(self) -> Tensor | None:
        return getattr(self.model, "bottleneck", None)


class FlowDenoiser(nn.Module):
    """A rectified-flow / flow-matching velocity model, x_t = (1 − t)·x0 + t·ε, v = ε − x0.

    model(x_t, t·time_scale, **cond) -> v̂. With t = σ/(1+σ) and x_t = x_σ/(1+σ): D = x_t − t·v̂.
    """

    def __init__(self, model: NetFn, time_scale: float = 1.0):
        super().__init__()
        self.model, self.time_scale = model, time_scale
        self.data_shape: tuple[int, ...] | None = None

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        t = sigma / (1 + sigma)
        t_b = append_dims(t, x.ndim).to(x.dtype)
        x_t = (1 - t_b) * x
        return x_t - t_b * call_network(self.model, x_t, t.to(x.dtype) * self.time_scale, **cond)

    @property
    def last_feature(self) -> Tensor | None:
        return getattr(self.model, "bottleneck", None)


def null_condition(cond: dict[str, Any]) -> dict[str, Any]:
    """The unconditional counterpart of `cond`: class labels become the null label −1."""
    if "class_labels" not in cond:
        raise ConfigError("classifier-free guidance needs an unconditional input: pass `uncond={...}` "
                          "or condition on class_labels (null label −1)")
    return {**cond, "class_labels": torch.full_like(cond["class_labels"], -1)}


def join_conditions(value_c: Any, value_u: Any, batch: int) -> Any:
    """One condition of the batched [conditional; unconditional] call: tensors concatenated, strings and
    per-sample lists of strings (prompts) as one list of 2·batch (a str or a 1-list broadcast to batch),
    anything else (equal in both halves) passed as it is."""
    if torch.is_tensor(value_c):
        return torch.cat([value_c, value_u])
    if isinstance(value_c, str) and value_c == value_u:
        return value_c
    if isinstance(value_c, (str, list)) and isinstance(value_u, (str, list)):
        def rows(value: str | list) -> list:
            value = [value] if isinstance(value, str) else value
            return value * batch if len(value) == 1 else value
        return rows(value_c) + rows(value_u)
    return value_c


class CFGDenoiser(nn.Module):
    """Classifier-free guidance: D_w = D_u + (1 + w)(D_c − D_u); w = 0 is the conditional model.

    Both halves are evaluated in one batched call. `w` is a float or [B] tensor, overridable per
    call with the keyword `w`. `uncond(cond) -> cond` gives the null condition (default: class
    labels set to −1; a text-to-image model's `null_condition`: prompt -> negative prompt).
    `last_feature` is the conditional half of the base's feature.
    """

    def __init__(self, denoiser: nn.Module, w: float | Tensor = 0.0,
                 uncond: Callable[[dict[str, Any]], dict[str, Any]] = null_condition):
        super().__init__()
        self.denoiser, self.w, self.uncond = denoiser, w, uncond
        self.sigma_min = getattr(denoiser, "sigma_min", None)
        self.sigma_max = getattr(denoiser, "sigma_max", None)

    def forward(self, x: Tensor, sigma: Tensor, w: float | Tensor | None = None, **cond: Any) -> Tensor:
        w = self.w if w is None else w
        w = append_dims(torch.as_tensor(w, dtype=x.dtype, device=x.device).expand(x.shape[0]), x.ndim)
        cond_u = self.uncond(cond)
        both = {k: join_conditions(cond[k], cond_u[k], x.shape[0]) for k in cond}
        d_c, d_u = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        return d_u + (1 + w) * (d_c - d_u)

    @property
    def last_feature(self) -> Tensor | None:
        feature = getattr(self.denoiser, "last_feature", None)
        return None if feature is None else feature.chunk(2)[0]
