"""DEFT: a small learned h-transform on a frozen denoiser (Denker et al., NeurIPS 2024; docs/methods/deft.md (2)–(6)).

The posterior's noise prediction is the base's plus a learned term,

    ε̂_post(x; σ, y) = ε̂_base(x; σ) + ε_φ(x, y, σ),
    ε_φ = NN1_φ([x·c_in, x̂0, g·σ_y², (y, mask)], σ) − NN2_φ(σ)·g,
    x̂0 = D_base(x; σ) (no gradient),  g = ∇_x̂0 log p(y | x̂0) = Aᵀ(y − A x̂0)/σ_y² (the operator only),

so the conditional denoiser is x − σ ε̂_post = D_base(x; σ) − σ·ε_φ (`deft_x0`, written once and used
by fitting and sampling). NN1's inputs are scaled to O(1) (c_in = 1/sqrt(σ² + σ_d²); g·σ_y² is the
back-projected residual); NN1's output layer starts at zero and NN2 (a scalar MLP of ln σ) has a
zero last weight and a small bias (0.01·σ_y²: 0.01 on the residual's scale), so at initialisation
D = D_base + σ·bias·g.

Fitting: denoising score matching on (x0, fresh y) pairs, the base frozen and called forward-only
under no_grad: min_φ E‖ε − ε̂_base(x_σ; σ) − ε_φ‖² = E‖(D(x_σ; σ) − x0)/σ‖², on the shared
Accelerate loop (`difflab.train.loop.fit`), ln σ ~ N(P_mean, P_std²) truncated to the base's σ range.

The h-network is an add-on: its config names its base model (its `fingerprint`) and its operator;
`DEFTDenoiser` refuses another base or another kind of operator (AddonMismatchError).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from difflab.condition.operators import Operator, operator_from_config
from difflab.condition.sigmas import truncated_log_normal
from difflab.core.denoiser import append_dims, sigma_batch
from difflab.core.errors import AddonMismatchError, ConfigError, ModelFormatError, ShapeError
from difflab.core.fingerprint import fingerprint
from difflab.core.serialization import SavedModel, read_model_folder
from difflab.models import check_base_model, register_kind
from difflab.nets import CUNet, UNet
from difflab.nets.embeddings import sinusoidal_embedding
from difflab.sampling.grids import model_sigma_range
from difflab.train.contract import FitResult, StepCallback
from difflab.train.loop import TrainConfig, data_fingerprint, fit


# ----- the networks ------------------------------------------------------------------------------
class VectorNet(nn.Module):
    """NN1 for vectors: [B, in_dim] and ln σ -> [B, out_dim]; residual SiLU blocks with the σ
    embedding added, zero-initialised output layer."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 128, depth: int = 3, embed_dim: int = 32):
        super().__init__()
        self.config = {"in_dim": in_dim, "out_dim": out_dim, "hidden": hidden, "depth": depth, "embed_dim": embed_dim}
        self.embed_dim = embed_dim
        self.embed = nn.Linear(embed_dim, hidden)
        self.input = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.output = nn.Linear(hidden, out_dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, features: Tensor, c_noise: Tensor) -> Tensor:
        emb = self.embed(sinusoidal_embedding(c_noise, self.embed_dim).to(features.dtype))
        h = self.input(features)
        for block in self.blocks:
            h = h + block(F.silu(h + emb))
        return self.output(F.silu(h))


class SigmaScalar(nn.Module):
    """NN2: a scalar MLP of ln σ, [B] -> [B]; last layer weight 0 and bias `bias` (docs/methods/deft.md (4))."""

    def __init__(self, hidden: int = 32, bias: float = 0.01, embed_dim: int = 16):
        super().__init__()
        self.embed_dim = embed_dim
        self.hidden = nn.Linear(embed_dim, hidden)
        self.output = nn.Linear(hidden, 1)
        nn.init.zeros_(self.output.weight)
        nn.init.constant_(self.output.bias, bias)

    def forward(self, c_noise: Tensor) -> Tensor:
        features = sinusoidal_embedding(c_noise, self.embed_dim).to(self.hidden.weight.dtype)
        return self.output(F.silu(self.hidden(features)))[:, 0]


# NN1 for images: the network class and its defaults (≈4% of the demo's digits U-Net for the U-Net,
# ≈2% for the cU-Net; the paper: 4–9% of the base). Anything else is refused, never imported by name.
IMAGE_NN1 = {
    "UNet": (UNet, {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                    "groups": 4}),
    "CUNet": (CUNet, {"base_channels": 8, "channel_mults": [1, 2], "attn_resolutions": [], "groups": 4,
                      "embed_dim": 32}),
}


def _image_nn1(name: str, image_size: int) -> tuple[type, dict]:
    """(network class, default keyword arguments) of the image NN1 called `name`; ConfigError if none."""
    if name not in IMAGE_NN1:
        raise ConfigError(f"DEFT's image NN1 is one of {sorted(IMAGE_NN1)}, got {name!r}")
    network, defaults = IMAGE_NN1[name]
    return network, {**defaults, "image_size": image_size}


def input_channels(operator: Operator) -> int:
    """How many x-shaped inputs NN1 reads: x, x̂0, g, and y / mask where the operator has them."""
    return 3 + int(operator.image_like) + int(operator.mask is not None)


class HNetwork(SavedModel, nn.Module):
    """ε_φ = NN1([x·c_in, x̂0, g·σ_y², (y), (mask)], σ) − NN2(σ)·g.

    data_shape: per-sample shape ([C, H, W]: NN1 is an image network, `nn1_class`; [D]: a `VectorNet`);
    operator: the measurement operator (its config is saved); base_model: the base's `fingerprint`;
    sigma_data: the c_in scale; nn1: keyword arguments of NN1; nn1_class: for images "UNet" (None:
    the default) or "CUNet" (the lighter ODE-block U-Net of nets/cunet.py); nn2_bias: NN2's initial output
    (default 0.01·σ_y², so that the initial term σ·NN2·g = 0.01·σ·Aᵀ(y − A x̂0) stays small whatever
    σ_y: with a bare 0.01 and σ_y = 0.05 it would move x̂0 by 4σ times the residual).
    """

    def __init__(self, data_shape: Sequence[int], operator: Operator, base_model: str | None = None,
                 sigma_data: float = 0.5, nn1: dict | None = None, nn2_hidden: int = 32,
                 nn2_bias: float | None = None, nn1_class: str | None = None):
        super().__init__()
        self.data_shape = tuple(int(s) for s in data_shape)
        self.operator_config = operator.config()
        self.base_model, self.sigma_data = base_model, float(sigma_data)
        self.inputs = input_channels(operator)
        nn1 = dict(nn1 or {})
        if len(self.data_shape) == 3:
            channels = self.data_shape[0]
            network, defaults = _image_nn1(nn1_class or "UNet", self.data_shape[-1])
            self.nn1 = network(in_channels=channels * self.inputs, out_channels=channels, zero_init_output=True,
                               **{**defaults, **nn1})
        elif len(self.data_shape) == 1:
            if nn1_class not in (None, "VectorNet"):
                raise ConfigError(f"DEFT's NN1 for vectors is a VectorNet, got nn1_class={nn1_class!r}")
            dim = self.data_shape[0]
            self.nn1 = VectorNet(dim * self.inputs, dim, **nn1)
        else:
            raise ShapeError(f"DEFT handles images [C, H, W] and vectors [D], got per-sample shape {self.data_shape}")
        self.nn1_args = dict(self.nn1.config.items())
        # 0.01 on the scale of the back-projected residual σ_y²·g = Aᵀ(y − A x̂0): a 1% step per unit σ
        nn2_bias = 0.01 * operator.sigma_y**2 if nn2_bias is None else float(nn2_bias)
        self.nn2 = SigmaScalar(nn2_hidden, nn2_bias)
        self.nn2_args = {"hidden": nn2_hidden, "bias": nn2_bias}
        self.fit_config: dict | None = None     # the DEFTConfig it was fitted with (`fit_deft` sets it)

    @property
    def operator_name(self) -> str:
        return self.operator_config["name"]

    def forward(self, x: Tensor, sigma: Tensor, x0_hat: Tensor, g: Tensor, operator: Operator,
                y: Tensor) -> Tensor:
        """ε_φ(x, y, σ): x, x0_hat, g: [B, *data_shape]; sigma: [B]; y: the measurement. -> [B, *data_shape]."""
        sigma_b = append_dims(sigma, x.ndim)
        c_in = 1 / (sigma_b**2 + self.sigma_data**2).sqrt()
        parts = [x * c_in, x0_hat, g * operator.sigma_y**2]
        image_y = operator.image_input(y)
        if image_y is not None:
            parts.append(image_y)
        if operator.mask is not None:
            parts.append(operator.mask.to(x.device, x.dtype).expand_as(x))
        if len(parts) != self.inputs:
            raise AddonMismatchError(f"this h-network reads {self.inputs} inputs, the operator gives {len(parts)}: "
                                     f"it was fitted for {self.operator_config}, got {operator.config()}")
        c_noise = sigma.log() / 4
        dtype = self.nn2.output.weight.dtype
        features = torch.cat(parts, dim=1).to(dtype)
        nn1_out = self.nn1(features, c_noise.to(dtype)).to(x.dtype)
        return nn1_out - append_dims(self.nn2(c_noise).to(x.dtype), x.ndim) * g

    # ----- on disk ---------------------------------------------------------------------------
    def config(self) -> dict:
        config = {"class": "DEFTHNetwork", "kind": "addon", "data_shape": list(self.data_shape),
                  "operator": self.operator_config, "base_model": self.base_model, "sigma_data": self.sigma_data,
                  "nn1": {"class": type(self.nn1).__name__, "args": self.nn1_args}, "nn2": self.nn2_args}
        return config if self.fit_config is None else {**config, "fit": self.fit_config}

    @classmethod
    def from_folder(cls, config: dict, tensors: dict[str, Tensor], path: Path) -> "HNetwork":
        """Rebuild from a folder's (config, tensors); `difflab.load` dispatches here."""
        try:
            operator = operator_from_config(config["operator"])
            nn1_args, nn1_class = dict(config["nn1"]["args"]), config["nn1"]["class"]
            if len(config["data_shape"]) == 3:
                nn1_args = {k: v for k, v in nn1_args.items() if k not in ("in_channels", "out_channels",
                                                                           "zero_init_output")}
            else:
                nn1_args = {k: v for k, v in nn1_args.items() if k not in ("in_dim", "out_dim")}
            hnet = cls(config["data_shape"], operator, config.get("base_model"), config.get("sigma_data", 0.5),
                       nn1_args, config["nn2"]["hidden"], config["nn2"]["bias"], str(nn1_class))
            hnet.load_state_dict(tensors)
            hnet.fit_config = config.get("fit")
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ModelFormatError(f"{path} is not a valid DEFT h-network ({err})") from err
        return hnet.eval().requires_grad_(False)


# ----- the conditional denoiser --------------------------------------------------------------------
def deft_x0(base: nn.Module, hnet: HNetwork, operator: Operator, x: Tensor, sigma: Tensor, y: Tensor,
            **cond: Any) -> Tensor:
    """D(x; σ, y) = x − σ(ε̂_base + ε_φ) = D_base(x; σ) − σ ε_φ, the base frozen and forward-only."""
    with torch.no_grad():
        x0_base = base(x, sigma, **cond)
        g = operator.log_likelihood_grad(x0_base, y)        # ∇ log p(y | x̂0): no Jacobian of the base
    eps_h = hnet(x, sigma, x0_base, g, operator, y)
    return x0_base - append_dims(sigma, x.ndim) * eps_h


def check_hnet(hnet: HNetwork, base: Any = None, operator: Operator | None = None) -> None:
    """AddonMismatchError unless `hnet` was fitted for this base model (a denoiser, folder or id) and
    this operator (same name and options, a fixed mask included; σ_y and random masks may differ)."""
    check_base_model("DEFT h-network", hnet.base_model, base, "fit one for this model (difflab condition fit)")
    if operator is not None:
        # σ_y may differ; a mask only matters when it is fixed (box / coords); random ones are drawn anew
        free = ("sigma_y",) if hnet.operator_config.get("mask") is not None else ("sigma_y", "mask")
        fitted = {k: v for k, v in hnet.operator_config.items() if k not in free}
        given_cfg = {k: v for k, v in operator.config().items() if k not in free}
        if fitted != given_cfg:
            raise AddonMismatchError(f"this DEFT h-network was fitted for the operator {fitted}, got {given_cfg}")


class DEFTDenoiser(nn.Module):
    """Base + h-network as ONE conditional denoiser D(x, sigma, y=y, **cond), so every solver of
    difflab.sampling works with it. Each call: one base call (no_grad) and one small h-network call.

    operator: defaults to the h-network's own (rebuilt from its config); pass one to give per-sample
    masks or another σ_y. check: refuse (AddonMismatchError) another base model or operator.
    """

    def __init__(self, base: nn.Module, hnet: HNetwork, operator: Operator | None = None, check: bool = True):
        super().__init__()
        operator = operator if operator is not None else operator_from_config(hnet.operator_config)
        if check:
            check_hnet(hnet, base, operator)
        self.base, self.hnet, self.operator = base, hnet, operator
        self.sigma_min = getattr(base, "sigma_min", None)
        self.sigma_max = getattr(base, "sigma_max", None)
        self.data_shape = getattr(base, "data_shape", None)

    def forward(self, x: Tensor, sigma: Tensor, y: Tensor | None = None, **cond: Any) -> Tensor:
        if y is None:
            raise ConfigError("the DEFT denoiser needs the measurement: call it with y=...")
        return deft_x0(self.base, self.hnet, self.operator, x, sigma_batch(sigma, x), y, **cond)


# ----- fitting -----------------------------------------------------------------------------------------
@dataclass
class DEFTConfig(TrainConfig):
    """A DEFT fit: the loop's settings with DEFT's defaults (Adam lr 1e−3, short warm-up, EMA 0.99, full
    precision) plus the method's own: batch_size per process; ln σ ~ N(p_mean, p_std²); NN1's keyword
    arguments `nn1` and, for images, its class `nn1_class` ("UNet" or "CUNet"; None: the default);
    `nn2_bias`: NN2's initial output (None: 0.01·σ_y²); `sigma_min` / `sigma_max`: the range the draws of σ
    are truncated to (None: the base model's own end; a range leaving the model's is refused)."""

    train_steps: int = 1000
    lr: float = 1e-3
    warmup_steps: int = 50
    ema_decay: float = 0.99
    mixed_precision: str = "no"
    checkpoint_every: int = 1000
    batch_size: int = 64
    p_mean: float = -0.5
    p_std: float = 1.5
    nn1: dict | None = None
    nn1_class: str | None = None
    nn2_bias: float | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 1 or self.p_std <= 0:
            raise ConfigError(f"need batch_size >= 1 and p_std > 0, got {self.batch_size} and {self.p_std}")
        ends = [end for end in (self.sigma_min, self.sigma_max) if end is not None]
        if not all(0 < end < math.inf for end in ends) or (len(ends) == 2 and ends[0] >= ends[1]):
            raise ConfigError(f"sigma_min / sigma_max must be finite, > 0 and increasing (or None: the model's), "
                              f"got {self.sigma_min} and {self.sigma_max}")


def deft_loss(base: nn.Module, operator: Operator, x0_data: Tensor, batch_size: int, p_mean: float = -0.5,
              p_std: float = 1.5, sigma_range: tuple[float, float] = (0.0, math.inf)):
    """loss_fn(hnet, generator, step, micro) for `fit`: E‖(D(x_σ; σ, y) − x0)/σ‖² = E‖ε − ε̂_base − ε_φ‖²
    on a random batch of x0_data [N, ...] with a fresh operator (masks) and fresh y every step;
    ln σ ~ N(p_mean, p_std²) truncated to ln sigma_range (a table model refuses any σ outside its own)."""

    def loss_fn(hnet: nn.Module, generator: torch.Generator, step: int = 0, micro: int = 0) -> Tensor:
        device = generator.device
        idx = torch.randint(len(x0_data), (batch_size,), generator=generator, device=device).to(x0_data.device)
        x0 = x0_data[idx].to(device)
        op = operator.resample(batch_size, generator)
        y = op.measure(x0, generator)
        sigma = truncated_log_normal(batch_size, generator, p_mean, p_std, sigma_range, x0.dtype)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        x0_hat = deft_x0(base, hnet, op, x0 + append_dims(sigma, x0.ndim) * noise, sigma, y)
        return ((x0_hat - x0) / append_dims(sigma, x0.ndim)).square().mean()

    return loss_fn


def fit_deft(base: nn.Module, operator: Operator, x0_data: Tensor, config: DEFTConfig = DEFTConfig(), *,
             out_dir: str | Path | None = None, callback: StepCallback | None = None, progress: bool = False,
             resume: bool = True) -> FitResult[HNetwork]:
    """Fit a DEFT h-network for `base` and `operator` on clean data x0_data [N, *shape].

    The base is frozen (requires_grad off for the fit, restored after) and only called under no_grad.
    ln σ ~ N(p_mean, p_std²) (config): wider than EDM's (−1.2, 1.2) and shifted up, because the h-term
    decides between modes at noise levels of the data's scale (on the 2-D mixture test, (0.5, 1.5)
    halved the sliced Wasserstein distance to the exact posterior against (−1.2, 1.2)); truncated to the
    base's declared [sigma_min, sigma_max] (a diffusers DDPM table: about [0.01, 157]) or the config's
    narrower range (SigmaRangeError, before any work, for one that leaves the model's).
    Returns a FitResult: model = the EMA h-network (eval mode, frozen; `config` under "fit" in its
    config.json); out_dir: the loop's checkpoints, resumed only for the same run (same data included).
    """
    config.validate()
    if len(x0_data) < 1:
        raise ConfigError("fit_deft needs some data: x0_data is empty")
    sigma_range = model_sigma_range(base, config.sigma_min, config.sigma_max)
    start = time.perf_counter()
    shape = tuple(x0_data.shape[1:])
    data_shape = getattr(base, "data_shape", None)
    if data_shape is not None and tuple(data_shape) != shape:
        raise ShapeError(f"the data have per-sample shape {shape}, the base model expects {tuple(data_shape)}")
    operator(x0_data[:1])   # the operator must accept this shape: fail before any work
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)   # the h-network's initial weights depend only on the seed
        hnet = HNetwork(shape, operator, fingerprint(base), getattr(base, "sigma_data", 0.5), config.nn1,
                        nn2_bias=config.nn2_bias, nn1_class=config.nn1_class)
    hnet = hnet.to(x0_data.dtype)
    grad_flags = [p.requires_grad for p in base.parameters()] if isinstance(base, nn.Module) else []
    if isinstance(base, nn.Module):
        base.requires_grad_(False)
    loss_fn = deft_loss(base, operator, x0_data, config.batch_size, config.p_mean, config.p_std, sigma_range)
    run = {"data": {"fingerprint": data_fingerprint(x0_data), "size": len(x0_data)}}
    try:
        result = fit(hnet, loss_fn, config, out_dir=out_dir, callback=callback, resume=resume, progress=progress,
                     description="fitting DEFT h-network", run=run)
    finally:
        for parameter, flag in zip(base.parameters() if isinstance(base, nn.Module) else [], grad_flags):
            parameter.requires_grad_(flag)
    fitted = result.model.eval().requires_grad_(False)
    fitted.fit_config = config.to_dict()
    return dataclasses.replace(result, model=fitted, timings={"total": time.perf_counter() - start})


def load_hnet(path: str | Path, base: Any = None, operator: Operator | None = None,
              device: str | torch.device = "cpu") -> HNetwork:
    """Load a saved h-network, refusing (AddonMismatchError) one fitted for another base or operator."""
    config, tensors = read_model_folder(Path(path))
    if config.get("class") != "DEFTHNetwork":
        raise ModelFormatError(f"{path} holds a {config.get('class')!r}, not a DEFT h-network")
    hnet = HNetwork.from_folder(config, tensors, Path(path))
    check_hnet(hnet, base, operator)
    return hnet.to(device)


def parameter_fraction(hnet: nn.Module, base: nn.Module) -> float:
    """The h-network's parameters as a fraction of the base model's."""
    return sum(p.numel() for p in hnet.parameters()) / max(sum(p.numel() for p in base.parameters()), 1)



register_kind("DEFTHNetwork", HNetwork.from_folder)

__all__ = ["HNetwork", "VectorNet", "SigmaScalar", "DEFTDenoiser", "deft_x0", "deft_loss", "DEFTConfig", "fit_deft",
           "load_hnet", "check_hnet", "parameter_fraction", "input_channels"]
