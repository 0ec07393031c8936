"""Training a base denoiser: the EDM loss (Karras et al. 2022, eq. 8 with Table 1's choices)."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from difflab.core.denoiser import append_dims
from difflab.core.errors import ConfigError, DivergenceWarning, ShapeError, warn
from difflab.core.wrappers import EDMDenoiser
from difflab.train.contract import FitResult, StepCallback, loss_divergence
from difflab.train.loop import TrainConfig, data_fingerprint, fit


@dataclass
class DenoiserConfig(TrainConfig):
    """A base denoiser's training: the loop's settings plus the batch per process, σ_data (None: the
    data's standard deviation), the label dropout (the null class, for guidance), the EDM σ sampling
    ln σ ~ N(p_mean, p_std²), the data set's name (recorded in the model's config) and how many times a
    diverging run goes back to its last healthy state with half the learning rate (`train.loop.fit`'s `rollbacks`;
    0: it goes on, and warns at the end)."""

    batch_size: int = 128
    sigma_data: float | None = None
    label_dropout: float = 0.1
    p_mean: float = -1.2
    p_std: float = 1.2
    dataset: str = "custom"
    divergence_rollbacks: int = 0

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 1 or not 0 <= self.label_dropout <= 1 or self.p_std <= 0:
            raise ConfigError(f"need batch_size >= 1, 0 <= label_dropout <= 1 and p_std > 0: {self}")
        if self.divergence_rollbacks < 0:
            raise ConfigError(f"divergence_rollbacks must be >= 0, got {self.divergence_rollbacks}")
        if self.sigma_data is not None and not self.sigma_data > 0:
            raise ConfigError(f"sigma_data must be > 0 (or None: the data's std), got {self.sigma_data}")


def edm_loss(denoiser: nn.Module, x0: Tensor, generator: torch.Generator, p_mean: float = -1.2,
             p_std: float = 1.2, sigma_data: float = 0.5, **cond) -> Tensor:
    """E_σ,ε λ(σ)‖D(x0 + σε; σ) − x0‖², ln σ ~ N(P_mean, P_std²), λ = (σ² + σd²)/(σ·σd)². x0: [B, ...]."""
    n = torch.randn(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
    sigma = (p_mean + p_std * n).exp()
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x0_hat = denoiser(x0 + append_dims(sigma, x0.ndim) * noise, sigma, **cond)
    return (append_dims(weight, x0.ndim) * (x0_hat - x0).square()).mean()


def denoiser_loss(x: Tensor, labels: Tensor | None, batch_size: int, sigma_data: float,
                  label_dropout: float = 0.1, p_mean: float = -1.2, p_std: float = 1.2):
    """loss_fn(denoiser, generator, step, micro) for `fit`: the EDM loss on a random batch of x: [N, ...] (and
    labels [N], dropped to the null label −1 with probability `label_dropout`, for guidance).
    The batch is drawn on the generator's device, so x may stay on the CPU."""

    def loss_fn(denoiser: nn.Module, generator: torch.Generator, step: int = 0, micro: int = 0) -> Tensor:
        device = generator.device
        idx = torch.randint(len(x), (batch_size,), generator=generator, device=device).to(x.device)
        cond = {}
        if labels is not None:
            keep = torch.rand(batch_size, generator=generator, device=device) >= label_dropout
            cond["class_labels"] = torch.where(keep, labels[idx].to(device), -1)
        return edm_loss(denoiser, x[idx].to(device), generator, p_mean, p_std, sigma_data, **cond)

    return loss_fn


def train_denoiser(net: nn.Module, x: Tensor, labels: Tensor | None = None, config: DenoiserConfig = DenoiserConfig(),
                   *, out_dir: str | Path | None = None, callback: StepCallback | None = None, progress: bool = True,
                   resume: bool = True) -> FitResult[EDMDenoiser]:
    """Train `net` as an EDM-preconditioned denoiser of the data x: [N, ...] (labels: [N] int or None).

    config.sigma_data defaults to the data's standard deviation. With labels, the network must be
    class-conditional and learns the null class too (label dropout), ready for guidance. Returns a
    FitResult whose model is the EMA denoiser (eval mode, frozen), with the config under "fit" in its
    config.json; the checkpoints in out_dir (if given) resume only the same run (same data included).
    """
    config.validate()
    if labels is not None and len(labels) != len(x):
        raise ShapeError(f"{len(x)} samples but {len(labels)} labels; expected one label per sample")
    start = time.perf_counter()
    sigma_data = float(x.std()) if config.sigma_data is None else config.sigma_data
    # the network's class count (a subset of classes keeps the labels, so max + 1 can undercount)
    net_config = getattr(net, "config", None)
    net_classes = net_config.get("num_classes") if isinstance(net_config, dict) else None
    num_classes = 0 if labels is None else int(net_classes or labels.max() + 1)
    denoiser = EDMDenoiser(net, sigma_data=round(sigma_data, 4), data_shape=tuple(x.shape[1:]),
                           meta={"dataset": config.dataset, "num_classes": num_classes})
    loss_fn = denoiser_loss(x, labels, config.batch_size, denoiser.sigma_data, config.label_dropout,
                            config.p_mean, config.p_std)
    run = {"data": {"fingerprint": data_fingerprint(x, labels), "size": len(x)}}
    description = f"training {type(net).__name__} on {config.dataset}"
    result = fit(denoiser, loss_fn, config, out_dir=out_dir, callback=callback, progress=progress, resume=resume,
                 description=description, run=run, rollbacks=config.divergence_rollbacks)
    fitted = result.model.eval().requires_grad_(False)
    fitted.meta["fit"] = config.to_dict()
    divergence = loss_divergence(result.history)
    if divergence is not None and result.is_main_process:
        warn(f"{description}: {divergence}", DivergenceWarning)
    return dataclasses.replace(result, model=fitted, timings={"total": time.perf_counter() - start})


__all__ = ["DenoiserConfig", "edm_loss", "denoiser_loss", "train_denoiser"]
