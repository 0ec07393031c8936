"""The w-conditioned student x̂_η(x, σ, c, w) of guided distillation, and its folder on disk.

`GuidedStudent` wraps a σ-space denoiser whose network has a spare conditioning slot and feeds the
guidance weight w into it (Meng et al. 2023, §3.1: "w enters through a sinusoidal embedding added
to the time embedding"):

| network                                   | slot            | what the student passes                          |
|-------------------------------------------|-----------------|--------------------------------------------------|
| difflab `MLP` / `UNet` (extra_embed=True) | `extra`         | w [B]; the net embeds it sinusoidally            |
| diffusers `UNet2DConditionModel`          | `timestep_cond` | `guidance_embedding(w)` [B, time_cond_proj_dim]  |

A difflab net's embedding is Linear-SiLU-Linear, its last Linear zero-initialised, added to the time
embedding; a diffusers UNet's `time_embedding.cond_proj` adds `guidance_embedding(w)`, which is
exactly what a stock diffusers pipeline computes for a UNet with `time_cond_proj_dim` (LCM students),
so such a student runs in one (the diffusers side, building and saving it, is
`difflab.interop.diffusers.student`).

`make_student(teacher)` copies a difflab conditional teacher into that form with the new projection at
zero, so the fresh student equals the teacher at every w (at w = 0 that is the guided teacher).

`PredictionDenoiser` turns a network trained to predict x, v or both (Salimans & Ho 2022, §4)
into a σ-space denoiser; difflab's `EDMDenoiser` is already the v form scaled by σ_data (with
σ_data = 1 it is exactly v-prediction, F = −v̂), so a student copied from an EDM teacher keeps it.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.core.denoiser import append_dims, call_network
from difflab.core.errors import ConfigError, ModelFormatError, ShapeError
from difflab.core.serialization import SavedModel, read_model_folder
from difflab.core.wrappers import CFGDenoiser, EDMDenoiser, vp_scale
from difflab.models import build_network, kind_loader, load_state, register_kind

PREDICTIONS = ("x", "v", "both")
W_SLOTS = ("extra", "timestep_cond")


class PredictionDenoiser(nn.Module):
    """A network predicting x, v or both, as a σ-space denoiser D(x, σ, **cond).

    With α = 1/sqrt(1 + σ²), s = σα (the VP noise std) and z = αx (the VP state; `vp_scale`), the
    network sees F(z, c_noise = ln(σ)/4, **cond) and
      x:    D = F
      v:    D = α·z − s·v̂ = α²·x − σα·v̂                    (v = α·ε − s·x0)
      both: F = (x̃, ε̃) stacked on dim 1 (2C channels); D = s²·x̃ + α(z − s·ε̃) = s²·x̃ + α²(x − σ·ε̃)
    ("both" mixes the x-prediction and the ε-implied one with weights s² + α² = 1.)
    """

    def __init__(self, net: nn.Module, prediction: str = "v", sigma_min: float = 0.002, sigma_max: float = 80.0,
                 data_shape: tuple[int, ...] | None = None, meta: dict | None = None):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ConfigError(f"prediction must be one of {PREDICTIONS}, got {prediction!r} (ε-prediction is "
                              "not offered: it blows up at high noise, docs/methods/distillation.md (5))")
        self.net, self.prediction = net, prediction
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.data_shape = None if data_shape is None else tuple(data_shape)
        self.meta = dict(meta or {})

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        sigma_b = append_dims(sigma, x.ndim).to(x.dtype)
        alpha = vp_scale(sigma_b)
        out = call_network(self.net, alpha * x, sigma.log() / 4, **cond)   # the network in its own dtype
        if self.prediction == "x":
            return out
        if self.prediction == "v":
            return alpha**2 * x - sigma_b * alpha * out
        if out.shape[1] != 2 * x.shape[1]:
            raise ShapeError(f"prediction 'both' needs a network with 2×{x.shape[1]} outputs on dim 1 (x̃ and ε̃), "
                             f"got {tuple(out.shape)}")
        x_tilde, eps_tilde = out.chunk(2, dim=1)
        s = sigma_b * alpha
        return s**2 * x_tilde + alpha**2 * (x - sigma_b * eps_tilde)

    @property
    def last_feature(self) -> Tensor | None:
        return getattr(self.net, "bottleneck", None)

    def config(self) -> dict:
        return {"class": "PredictionDenoiser", "kind": "denoiser", "convention": f"{self.prediction}-prediction",
                "prediction": self.prediction, "network": {"class": type(self.net).__name__, "args": self.net.config},
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "data_shape": None if self.data_shape is None else list(self.data_shape), **self.meta}


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """The guidance-weight features of a `timestep_cond` slot: w [B] -> [B, dim] float32.

    Exactly diffusers' `get_guidance_scale_embedding(guidance_scale − 1, dim)` (VDM's sinusoidal
    embedding of 1000·w: sines, then cosines, frequencies 10000^(−k/(dim/2 − 1)), a zero column for odd
    dim), which a stock pipeline feeds a UNet with `time_cond_proj_dim`; its argument, diffusers'
    guidance scale − 1, is difflab's w. Computed in float32 step by step as there, so bit-identical
    (docs/methods/distillation.md (11)).
    """
    scaled = w.float() * 1000.0
    half = dim // 2
    rate = torch.log(torch.tensor(10000.0)) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -rate).to(scaled.device)
    angles = scaled[:, None] * frequencies[None, :]
    features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(features, (0, dim % 2))


class GuidedStudent(SavedModel, nn.Module):
    """x̂_η(x, σ, c, w): a σ-space denoiser reading the guidance weight w (call with `w=`, float or [B]).

    denoiser: the wrapped σ-space denoiser (EDMDenoiser / PredictionDenoiser / VPDenoiser) whose
    network has the w slot; w_slot: "extra" (difflab nets) or "timestep_cond" (diffusers, with
    w_embed_dim features). The remaining keywords record what it was distilled for and from (saved in
    config.json): base_model (the fingerprint of the guided teacher's conditional model), teacher
    (fingerprint of the model it was distilled from in its last stage), stage ("guided" / "progressive"),
    steps (the sampling steps a progressive student was trained for; None: any), w_min, w_max,
    grid_sigma_max (top of the cosine σ-grid), dataset, kept_classes (the teacher's classes when it
    was trained on some only), fit (the config of its last stage, `GuidedDistillConfig` /
    `ProgressiveDistillConfig.to_dict()`).
    """

    def __init__(self, denoiser: nn.Module, w_slot: str = "extra", w_embed_dim: int | None = None, *,
                 base_model: str | None = None, teacher: str | None = None, stage: str = "guided",
                 steps: int | None = None, w_min: float = 0.0, w_max: float = 4.0,
                 grid_sigma_max: float | None = None, dataset: str | None = None,
                 kept_classes: list[int] | None = None, fit: dict | None = None):
        super().__init__()
        if w_slot not in W_SLOTS:
            raise ConfigError(f"w_slot must be one of {W_SLOTS}, got {w_slot!r}")
        if w_slot == "timestep_cond" and not w_embed_dim:
            raise ConfigError("w_slot 'timestep_cond' needs w_embed_dim (the UNet's time_cond_proj_dim)")
        self.denoiser, self.w_slot, self.w_embed_dim = denoiser, w_slot, w_embed_dim
        self.distilled = {"base_model": base_model, "teacher": teacher, "stage": stage, "steps": steps,
                          "w_min": float(w_min), "w_max": float(w_max),
                          "grid_sigma_max": grid_sigma_max or getattr(denoiser, "sigma_max", None),
                          "dataset": dataset}
        if kept_classes is not None:   # only when set: the config (hence fingerprint) of other students is unchanged
            self.distilled["kept_classes"] = [int(c) for c in kept_classes]
        if fit is not None:
            self.distilled["fit"] = dict(fit)

    # the denoiser attributes samplers and the CLI read
    sigma_min = property(lambda self: getattr(self.denoiser, "sigma_min", None))
    sigma_max = property(lambda self: getattr(self.denoiser, "sigma_max", None))
    data_shape = property(lambda self: getattr(self.denoiser, "data_shape", None))
    last_feature = property(lambda self: getattr(self.denoiser, "last_feature", None))
    steps = property(lambda self: self.distilled["steps"])
    base_model = property(lambda self: self.distilled["base_model"])
    grid_sigma_max = property(lambda self: self.distilled["grid_sigma_max"])

    @property
    def num_classes(self) -> int:
        meta = getattr(self.denoiser, "meta", {}) or {}
        return int(meta.get("num_classes", 0) or 0)

    def forward(self, x: Tensor, sigma: Tensor, w: float | Tensor = 0.0, **cond: Any) -> Tensor:
        """x: [B, ...]; sigma: [B]; w: float or [B]; cond: e.g. class_labels [B]. Returns x0_hat [B, ...]."""
        w = torch.as_tensor(w, dtype=x.dtype, device=x.device).expand(x.shape[0])
        if self.w_slot == "extra":
            return self.denoiser(x, sigma, extra=w, **cond)
        return self.denoiser(x, sigma, timestep_cond=guidance_embedding(w, self.w_embed_dim).to(x.dtype), **cond)

    # ----- on disk (difflab networks only) -------------------------------------------------
    def config(self) -> dict:
        """What it is (its fingerprint's and folder's config); a diffusers student's network is described by
        the UNet's own config, so it has no "denoiser" entry."""
        inner = getattr(self.denoiser, "config", None)
        described = {"denoiser": inner()} if callable(inner) else {}
        return {"class": "GuidedStudent", "kind": "student", "w_slot": self.w_slot, "w_embed_dim": self.w_embed_dim,
                **described, **self.distilled}

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write a difflab student folder (config.json + model.safetensors); a diffusers student is refused."""
        if self.w_slot != "extra" or not callable(getattr(self.denoiser, "config", None)):
            raise ConfigError("only students of difflab networks (slot 'extra') are saved as difflab folders; "
                              "save a diffusers student as a pipeline folder with "
                              "difflab.interop.diffusers.save_diffusers_student")
        return super().save(path, overwrite)

    @classmethod
    def from_folder(cls, config: dict, tensors: dict[str, Tensor], path: Path) -> "GuidedStudent":
        """Rebuild from a folder's (config, tensors); `difflab.load` dispatches here."""
        inner_config = config.get("denoiser")
        inner_tensors = {k.removeprefix("denoiser."): v for k, v in tensors.items() if k.startswith("denoiser.")}
        if not isinstance(inner_config, dict) or set(tensors) != {f"denoiser.{k}" for k in inner_tensors}:
            raise ModelFormatError(f"{path} is not a valid GuidedStudent folder (no inner denoiser config, or weights "
                                   "outside it)")
        if inner_config.get("class") == "PredictionDenoiser":
            denoiser = _load_prediction_denoiser(inner_config, inner_tensors, path)
        elif inner_config.get("class") == "EDMDenoiser":
            denoiser = kind_loader("EDMDenoiser")(inner_config, inner_tensors, path)
        else:
            raise ModelFormatError(f"{path}: a GuidedStudent cannot wrap a {inner_config.get('class')!r}")
        keys = ("base_model", "teacher", "stage", "steps", "w_min", "w_max", "grid_sigma_max", "dataset",
                "kept_classes", "fit")
        try:
            student = cls(denoiser, config.get("w_slot", "extra"), config.get("w_embed_dim"),
                          **{k: config[k] for k in keys if k in config})
        except (TypeError, ConfigError) as err:
            raise ModelFormatError(f"{path} is not a valid GuidedStudent ({err})") from err
        return student.eval().requires_grad_(False)


def _load_prediction_denoiser(config: dict, tensors: dict[str, Tensor], path: Path) -> PredictionDenoiser:
    known = {"class", "kind", "convention", "prediction", "network", "sigma_min", "sigma_max", "data_shape",
             "difflab_version"}
    denoiser = PredictionDenoiser(build_network(config.get("network")), config.get("prediction", "v"),
                                  config.get("sigma_min", 0.002), config.get("sigma_max", 80.0),
                                  config.get("data_shape"), {k: v for k, v in config.items() if k not in known})
    load_state(denoiser, tensors, path)
    return denoiser


def load_student(path: str | Path, device: str | torch.device = "cpu") -> GuidedStudent:
    """Load a student folder, refusing (ModelFormatError) a folder that holds another kind of model."""
    config, tensors = read_model_folder(Path(path))
    if config.get("class") != "GuidedStudent":
        raise ModelFormatError(f"{path} holds a {config.get('class')!r}, not a GuidedStudent (from `difflab distill`)")
    return GuidedStudent.from_folder(config, tensors, Path(path)).to(device)


# ----- a student from a teacher -------------------------------------------------------------------
def clone_model(model: nn.Module) -> nn.Module:
    """copy.deepcopy, after dropping the networks' cached `bottleneck` features (tensors of the last call,
    which may hold an autograd graph that deepcopy refuses)."""
    for module in model.modules():
        if isinstance(getattr(module, "bottleneck", None), Tensor):
            module.bottleneck = None
    return copy.deepcopy(model)


def make_student(model: nn.Module, **distilled: Any) -> GuidedStudent:
    """A fresh w-conditioned student initialised from the conditional teacher (Meng et al. 2023, §3.1).

    model: the teacher, the conditional model (or a CFGDenoiser around it, or a GuidedStudent, which is copied);
    its network gets a w slot whose new projection starts at zero, so the student equals the teacher
    for every w until trained. Supported: EDMDenoiser / PredictionDenoiser with a difflab network
    (a diffusers UNet2DConditionModel teacher: `difflab.interop.diffusers.make_diffusers_student`).
    `distilled`: GuidedStudent's keywords.
    """
    teacher = model.denoiser if isinstance(model, CFGDenoiser) else model
    if isinstance(teacher, GuidedStudent):
        student = clone_model(teacher)
        student.distilled.update(distilled)
        return student.train().requires_grad_(True)
    difflab_net = isinstance(getattr(getattr(teacher, "net", None), "config", None), dict)
    if isinstance(teacher, (EDMDenoiser, PredictionDenoiser)) and difflab_net:
        denoiser = clone_model(teacher)
        denoiser.net = _with_extra_slot(denoiser.net)
        return GuidedStudent(denoiser.train().requires_grad_(True), "extra", **distilled)
    raise ConfigError(f"cannot build a w-conditioned student from a {type(teacher).__name__}; supported: a difflab "
                      "EDMDenoiser / PredictionDenoiser (MLP, UNet); for a diffusers UNet2DConditionModel use "
                      "difflab.interop.diffusers.make_diffusers_student")


def _with_extra_slot(net: nn.Module) -> nn.Module:
    """`net` (a copy) as a network built with extra_embed=True, every teacher weight copied; the new
    `cond_embed.extra_embed` starts with a zero output layer (ScalarEmbedding(zero_init_output=True))."""
    if net.config.get("extra_embed"):
        return net
    student_net = type(net)(**{**net.config, "extra_embed": True}).to(next(net.parameters()).device)
    missing, unexpected = student_net.load_state_dict(net.state_dict(), strict=False)
    if unexpected or not all(k.startswith("cond_embed.extra_embed.") for k in missing):
        raise ConfigError(f"cannot copy the teacher's {type(net).__name__} into a student (missing {missing}, "
                          f"unexpected {unexpected})")
    return student_net


register_kind("GuidedStudent", GuidedStudent.from_folder)

__all__ = ["PREDICTIONS", "PredictionDenoiser", "GuidedStudent", "make_student", "load_student", "guidance_embedding",
           "clone_model"]
