"""Few-step samplers for a (distilled) denoiser, in σ-space (Meng et al. 2023, §3.3; editing: §4.2).

A DDIM step in VP form, z_s = α_s x̂ + σ_s (z_t − α_t x̂)/σ_t, divided by α_s is
x_s = x̂ + (σ_s/σ_t)(x_t − x̂): the Euler step of the probability-flow ODE in σ-space. It is
written once here (`ddim_step`) and used by the samplers, the editing loops and the progressive
distillation targets.

- `sample_deterministic`: N student steps on a grid, N evaluations.
- `sample_stochastic`: from σ_i jump deterministically two levels down to σ_{i+2}, then go back
  up to σ_{i+1} with the forward kernel (`renoise`); also N evaluations. The last step, with no
  level two below, is deterministic.
- `img2img`: noise an image to an intermediate level of the grid and finish with the remaining
  student steps. `inpaint`: sample while replacing the known pixels, after every step, by the known
  image re-noised to the current level.
- `sample_student`: the `difflab sample --model STUDENT` entry point (per-sample seeds).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from difflab.core.denoiser import append_dims, sigma_batch
from difflab.core.errors import ConfigError, NonFiniteError, ShapeError
from difflab.distill.schedule import student_sigmas
from difflab.sampling.grids import check_grid
from difflab.sampling.noise import PerSampleGenerator, randn_like, seeded_noise

Generator = torch.Generator | PerSampleGenerator | None
Replace = Callable[[int, Tensor, float], Tensor] | None      # (step, state at sigma_next, sigma_next) -> state


def ddim_step(x: Tensor, x0_hat: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """x_s = x̂ + (σ_s/σ_t)(x_t − x̂): DDIM (Song et al. 2021, eq. 12 with η = 0) in σ-space.

    x, x0_hat: [B, ...] at level sigma; sigma, sigma_next: floats or [B]. σ_next = 0 returns x̂.
    """
    ratio = sigma_batch(sigma_next, x) / sigma_batch(sigma, x)
    return x0_hat + append_dims(ratio, x.ndim) * (x - x0_hat)


def kernel_std(sigma_from: Tensor | float, sigma_to: Tensor | float) -> Tensor:
    """Std of the forward kernel q(x_to | x_from), σ_to > σ_from: sqrt(σ_to² − σ_from²).

    In VP form this is the variance (1 − e^{λ_to − λ_from})·σ_vp,to² of z_to given z_from
    (docs/methods/distillation.md (10)), divided by α_to² (x = z/α, e^λ = 1/σ²).
    """
    sigma_from, sigma_to = (v if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64)
                            for v in (sigma_from, sigma_to))
    return (sigma_to.square() - sigma_from.square()).sqrt()


def renoise(x: Tensor, sigma_from: Tensor | float, sigma_to: Tensor | float, noise: Tensor) -> Tensor:
    """A draw of the forward kernel: x_to = x_from + sqrt(σ_to² − σ_from²)·ε. x, noise: [B, ...]."""
    std = kernel_std(sigma_batch(sigma_from, x), sigma_batch(sigma_to, x))
    return x + append_dims(std, x.ndim) * noise


def _evaluate(student, x: Tensor, sigma: float, i: int, **cond: Any) -> Tensor:
    x0_hat = student(x, sigma_batch(sigma, x), **cond)
    if not bool(torch.isfinite(x0_hat).all()):
        raise NonFiniteError(f"the student's output is not finite at step {i} (sigma {sigma:.4g}); check the model")
    return x0_hat


def sample_deterministic(student, x: Tensor, sigmas: Tensor, replace: Replace = None, **cond: Any) -> Tensor:
    """N DDIM steps of the student over sigmas: [N + 1] decreasing (may end at 0). N evaluations.

    x: [B, ...] at sigmas[0]; cond: passed to the student (e.g. w, class_labels). `replace(i, x,
    sigma_next)` may rewrite the state after each step (inpainting). Returns x at sigmas[-1].
    """
    levels = check_grid(sigmas).tolist()
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        x = ddim_step(x, _evaluate(student, x, sigma, i, **cond), sigma, sigma_next)
        if replace is not None:
            x = replace(i, x, sigma_next)
    return x


def sample_stochastic(student, x: Tensor, sigmas: Tensor, generator: Generator = None, replace: Replace = None,
                      **cond: Any) -> Tensor:
    """The stochastic N-step sampler (Meng et al. 2023, §3.3): N evaluations, like the deterministic one.

    Step i: x̂ = student(x, σ_i); DDIM two levels down to σ_{i+2}; forward kernel back up to σ_{i+1}
    (`renoise`). The last step (σ_{N−1} → σ_N, no level below) is a plain DDIM step. Noise comes
    from `generator` (a PerSampleGenerator for batch-size-independent samples).
    """
    levels = check_grid(sigmas).tolist()
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        x0_hat = _evaluate(student, x, sigma, i, **cond)
        if i + 2 < len(levels):
            sigma_down = levels[i + 2]
            x_down = ddim_step(x, x0_hat, sigma, sigma_down)                       # two steps down
            x = renoise(x_down, sigma_down, sigma_next, randn_like(x, generator))   # one step back up
        else:
            x = ddim_step(x, x0_hat, sigma, sigma_next)
        if replace is not None:
            x = replace(i, x, sigma_next)
    return x


def run_sampler(student, x: Tensor, sigmas: Tensor, stochastic: bool = False, generator: Generator = None,
                replace: Replace = None, **cond: Any) -> Tensor:
    """`sample_stochastic` if stochastic else `sample_deterministic` (same arguments)."""
    if stochastic:
        return sample_stochastic(student, x, sigmas, generator, replace, **cond)
    return sample_deterministic(student, x, sigmas, replace, **cond)


def img2img(student, image: Tensor, sigmas: Tensor, start: int, stochastic: bool = False,
            generator: Generator = None, **cond: Any) -> Tensor:
    """Image-to-image editing (SDEdit with a student, Meng et al. 2023, §4.2): noise `image` to
    sigmas[start] and finish with the len(sigmas) − 1 − start remaining student steps.

    image: [B, ...] clean; sigmas: the student's grid [N + 1]; start: 0 < start < N (start = N − 2
    finishes in 2 steps). Returns the edited images [B, ...].
    """
    n_steps = len(sigmas) - 1
    if not 0 <= start < n_steps:
        raise ConfigError(f"start must be in [0, {n_steps - 1}] for a {n_steps}-step grid, got {start}")
    sigma_start = float(sigmas[start])
    x = renoise(image, 0.0, sigma_start, randn_like(image, generator))
    return run_sampler(student, x, sigmas[start:], stochastic, generator, **cond)


def inpaint(student, known: Tensor, mask: Tensor, sigmas: Tensor, stochastic: bool = False,
            generator: Generator = None, **cond: Any) -> Tensor:
    """Inpainting with a student (Meng et al. 2023, §4.2): sample from noise and, after every step, set
    the known pixels to the known image re-noised to the new level (fresh noise each step).

    known: [B, ...] the image (its unknown pixels are ignored); mask: broadcastable to known, 1 where
    known, 0 where to fill; sigmas: [N + 1] ending at 0, so the known pixels end exactly as given.
    """
    try:
        broadcast = torch.broadcast_shapes(mask.shape, known.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != known.shape:
        raise ShapeError(f"mask of shape {tuple(mask.shape)} does not broadcast to the image's {tuple(known.shape)}")
    keep = mask.to(known.dtype)

    def replace(i: int, x: Tensor, sigma_next: float) -> Tensor:
        noisy_known = renoise(known, 0.0, sigma_next, randn_like(known, generator))
        return keep * noisy_known + (1 - keep) * x

    x = replace(-1, float(sigmas[0]) * randn_like(known, generator), float(sigmas[0]))
    return run_sampler(student, x, sigmas, stochastic, generator, replace, **cond)


def sample_student(model, n: int, steps: int | None = None, w: float = 0.0, class_label: int | None = None,
                   stochastic: bool = False, seed: int = 0, device: str | torch.device = "cpu",
                   batch_size: int = 256) -> Tensor:
    """n samples of a guided student (or any denoiser taking `w`) with `steps` steps: [n, *data_shape].

    Sample i's initial noise comes from seed + i and its stochastic-step noise from seed + i + 2⁴⁰,
    so samples do not depend on batch_size. steps defaults to the steps the student was distilled
    for; a progressive student refuses another count (use the round folder for that count).
    """
    trained_for = getattr(model, "steps", None)
    steps = trained_for if steps is None else steps
    if steps is None:
        raise ConfigError("this model was not distilled for a step count; pass steps")
    if trained_for is not None and steps != trained_for:
        raise ConfigError(f"this student was distilled for {trained_for} steps, asked for {steps}; use "
                          f"steps={trained_for} (CLI: --nfe {trained_for}), or the student of the round for {steps} "
                          "steps")
    data_shape = getattr(model, "data_shape", None)
    if data_shape is None:
        raise ConfigError("the model does not record its data shape; cannot draw noise for it")
    num_classes = getattr(model, "num_classes", 0) or 0
    if class_label is not None and not -1 <= class_label < max(num_classes, 1):
        raise ConfigError(f"class {class_label} is outside this model's classes 0..{num_classes - 1}")
    sigmas = student_sigmas(steps, getattr(model, "grid_sigma_max", None) or model.sigma_max)
    model = model.to(device)
    chunks = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            seeds = list(range(seed + start, seed + min(n, start + batch_size)))
            x = seeded_noise(seeds, data_shape, float(sigmas[0]), device=device)
            cond: dict[str, Any] = {"w": torch.full((len(seeds),), float(w), device=device)}
            if class_label is not None:
                cond["class_labels"] = torch.full((len(seeds),), int(class_label), device=device)
            generator = per_sample_generator(seeds)
            chunks.append(run_sampler(model, x, sigmas, stochastic, generator, **cond).cpu())
    return torch.cat(chunks)


def per_sample_generator(seeds: Sequence[int]) -> PerSampleGenerator:
    """A PerSampleGenerator for the noise of stochastic steps (seeds offset by 2⁴⁰ from the initial noise)."""
    return PerSampleGenerator([s + 2**40 for s in seeds])


__all__ = ["ddim_step", "kernel_std", "renoise", "sample_deterministic", "sample_stochastic", "run_sampler",
           "img2img", "inpaint", "sample_student", "per_sample_generator"]
