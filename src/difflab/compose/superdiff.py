"""SuperDiff: superposition of diffusion models by OR (mixture) and AND (equal densities).

Skreta, Atanackovic, Bose, Tong, Neklyudov, ICLR 2025 (arXiv 2412.17762); docs/methods/superdiff.md.
Every step mixes the models' ε̂ with weights κ (Σκ = 1) into one field that moves x, and updates
each model's log-density log q_i along the realised path (compose/ito.py):

    field(κ) = Σ κ_i ε̂_i                    (with guidance: ε̂_u + (1 + w)(Σ κ_i ε̂_i − ε̂_u))
    SDE:  dx = 2·dσ·field(κ) + ξ,  ξ = sqrt(2σ|dσ|)·z        Δ log q_i = −⟨dx, ε̂_i⟩/σ − (|dσ|/σ)‖ε̂_i‖²
    ODE:  dx = dσ·field(κ)                                   Δ log q_i = |dσ|·∇·ε̂_i − (|dσ|/σ)⟨ε̂_i, ε̂_i − field⟩

Both increments are affine in κ: Δ(κ) = A·κ + b (A: [N, M, M], b: [N, M]); the rules choose κ:

    OR       κ = softmax(T·log q + ℓ)   from the log-densities before the step (T = 1: the exact mixture)
    AND      A·κ + b − ℓ·|dσ|/σ = λ·1, Σκ = 1: the bordered (M+1)×(M+1) system [[A, −1], [1ᵀ, 0]];
             for M = 2 its closed form, which for the plain SDE is κ_1 = ½ + ⟨ξ, δ⟩/(2|dσ|‖δ‖²), δ = ε̂_1 − ε̂_2
    average  κ = softmax(ℓ), fixed (the baseline; ℓ = 0: the plain mean of the ε̂)

AND's bias ℓ is a rate: log q_i − log q_j grows by (ℓ_i − ℓ_j) per unit of log σ travelled.
Ill-conditioning guard (AND): where the models' ε̂ nearly agree, A is nearly singular and κ is
unbounded (κ_1 − ½ ∝ 1/‖δ‖²). Singular values of the (row-normalised) bordered system below
`rcond` × the largest are dropped (a truncated pseudo-inverse), so κ is the minimum-norm solution:
the agreeing models share their weight evenly (and ℓ is not applied in that direction). For M = 2
the same test reads ‖δ‖² ≤ rcond·(‖ε̂_1‖² + ‖ε̂_2‖²) and gives κ = (½, ½). Guarded steps are counted
per sample in the result (`guarded_steps`), not raised: near σ_max the models always agree.
AND's κ depends on the step's noise, which biases the plain Itô estimates; `noise_correction`
adds the missing term (compose/ito.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from difflab.compose.components import Components
from difflab.compose.ito import hutchinson, inner, ito_increment, ode_increment, projected_noise_correction, rademacher
from difflab.core.errors import ConfigError, NonFiniteError, SigmaRangeError, UnknownNameError
from difflab.sampling.grids import check_grid
from difflab.sampling.noise import PerSampleGenerator, randn_like

MODES = ("or", "and", "average")
DEFAULT_RCOND = 1e-9


@dataclass
class Trajectory:
    """The whole path, for plots: sigmas [S+1]; x [S+1, N, ...]; log_q [S+1, N, M]; kappa [S, N, M]."""

    sigmas: Tensor
    x: Tensor
    log_q: Tensor
    kappa: Tensor


@dataclass
class CompositionResult:
    """Samples and per-model log-densities.

    x: [N, ...] at sigmas[-1]; log_q: [N, M] float64, each model's log q_i(x) − log q_i(x_start)
    (all models share the prior N(0, σ_max²I), so the start is one common constant);
    kappa: [N, M] the last step's weights; guarded_steps: [N] AND steps where the guard acted;
    model_calls: denoiser calls made (a batched call over M conditions counts once);
    trajectory: the full path if asked for.
    """

    x: Tensor
    log_q: Tensor
    kappa: Tensor
    guarded_steps: Tensor
    model_calls: int
    trajectory: Trajectory | None = None


# ----- the κ rules ------------------------------------------------------------------------------
def or_kappa(log_q: Tensor, temperature: float = 1.0, bias: Tensor | None = None) -> Tensor:
    """OR: κ = softmax(T·log q + ℓ) over models (softmax subtracts the per-sample maximum). [N, M] -> [N, M]."""
    logits = temperature * log_q + (0 if bias is None else bias.to(log_q))
    return torch.softmax(logits, dim=-1)


def average_kappa(n: int, bias: Tensor) -> Tensor:
    """The averaging baseline: fixed κ = softmax(ℓ) (uniform for ℓ = 0). -> [n, M] float64."""
    return torch.softmax(bias.double(), 0).expand(n, -1)


def and_kappa(A: Tensor, b: Tensor, rcond: float = DEFAULT_RCOND) -> tuple[Tensor, Tensor]:
    """AND: κ with Σκ = 1 making every A·κ + b equal. A: [N, M, M]; b: [N, M] (bias already in b).

    M = 2: the closed form (`and_kappa_two`); otherwise the bordered system (`and_kappa_system`).
    Returns (κ [N, M] float64, guarded [N] bool).
    """
    return and_kappa_two(A, b, rcond) if A.shape[-1] == 2 else and_kappa_system(A, b, rcond)


def and_kappa_two(A: Tensor, b: Tensor, rcond: float = DEFAULT_RCOND) -> tuple[Tensor, Tensor]:
    """Two models: Δ_1 = Δ_2 with κ_2 = 1 − κ_1 is one linear equation in κ_1 (docs/methods/superdiff.md (10)).

    κ_1 = (b_2 − b_1 + A_22 − A_12) / (A_11 − A_21 − A_12 + A_22); for the plain SDE step this is
    ½ + ⟨ξ, δ⟩/(2|dσ|‖δ‖²). Guard: a denominator below rcond·(|A_11| + |A_22|) gives κ = (½, ½).
    """
    A, b = A.double(), b.double()
    denominator = A[:, 0, 0] - A[:, 1, 0] - A[:, 0, 1] + A[:, 1, 1]
    numerator = b[:, 1] - b[:, 0] + A[:, 1, 1] - A[:, 0, 1]
    guarded = denominator.abs() <= rcond * (A[:, 0, 0].abs() + A[:, 1, 1].abs())
    kappa_1 = torch.where(guarded, 0.5, numerator / torch.where(guarded, 1.0, denominator))
    return torch.stack([kappa_1, 1 - kappa_1], dim=-1), guarded


def and_kappa_system(A: Tensor, b: Tensor, rcond: float = DEFAULT_RCOND) -> tuple[Tensor, Tensor]:
    """M models: [[A, −1], [1ᵀ, 0]]·[κ; λ] = [−b; 1] (docs/methods/superdiff.md (9)), by a truncated SVD.

    Rows of A, b are first divided by the mean |A_ii| (κ is unchanged; λ rescales), so the cutoff
    `rcond` (relative to the largest singular value) is scale-free. Returns (κ [N, M], guarded [N]).
    """
    A, b = A.double(), b.double()
    n, m = b.shape
    scale = A.diagonal(dim1=1, dim2=2).abs().mean(-1).clamp_min(torch.finfo(torch.float64).tiny)[:, None, None]
    system = torch.zeros(n, m + 1, m + 1, dtype=torch.float64, device=A.device)
    system[:, :m, :m] = A / scale
    system[:, :m, m] = -1
    system[:, m, :m] = 1
    rhs = torch.cat([-b / scale[:, :, 0], torch.ones(n, 1, dtype=torch.float64, device=A.device)], dim=1)
    U, S, Vh = torch.linalg.svd(system)
    keep = rcond * S[:, :1] < S
    inv_s = torch.where(keep, 1 / torch.where(keep, S, 1.0), 0.0)
    solution = Vh.mT @ (inv_s[:, :, None] * (U.mT @ rhs[:, :, None]))
    return solution[:, :m, 0], ~keep.all(-1)


# ----- one step as an affine function of κ -------------------------------------------------------
def field_basis(eps_models: Tensor, eps_uncond: Tensor | None, w: float | None) -> tuple[Tensor | None, Tensor]:
    """The mixed field as c_0 + Σ_j κ_j c_j: plain c_0 = 0, c_j = ε̂_j; with guidance w (D_w = D_u +
    (1+w)(D_c − D_u)) c_0 = −w·ε̂_u, c_j = (1+w)·ε̂_j. Returns (c_0 [N, ...] or None, c [M, N, ...])."""
    if w is None:
        return None, eps_models
    return -w * eps_uncond, (1 + w) * eps_models


def mix(kappa: Tensor, c0: Tensor | None, c: Tensor) -> Tensor:
    """c_0 + Σ_j κ_j c_j. kappa: [N, M]; c: [M, N, ...] -> [N, ...] in c's dtype."""
    weights = kappa.T.to(c.dtype).reshape(*kappa.T.shape, *([1] * (c.ndim - 2)))
    mixed = (weights * c).sum(0)
    return mixed if c0 is None else c0 + mixed


def drift_matrix(eps_models: Tensor, c: Tensor, drift_scale: float, sigma: float) -> Tensor:
    """A of Δ(κ) = A·κ + b for a step whose x-increment is drift_scale·(c_0 + Σ_j κ_j c_j) + (noise).

    Both estimators are affine in the increment with the same linear part −⟨·, ε̂_i⟩/σ (SDE: dx;
    ODE: dx = dσ·u), so A_ij = −drift_scale·⟨c_j, ε̂_i⟩/σ, and b is the estimator's own Δ at κ = 0
    (field c_0, noise included). drift_scale: 2·dσ (SDE) or dσ (ODE).
    eps_models, c: [M, N, ...]. Returns A [N, M, M] in float64.
    """
    gram = inner(eps_models[:, None], c[None], eps_models.ndim - 2)      # ⟨ε̂_i, c_j⟩  [M_i, M_j, N]
    return (-drift_scale / sigma) * gram.permute(2, 0, 1)


# ----- the sampler ---------------------------------------------------------------------------------
def superdiff(models: Components | Sequence[Any], x: Tensor, sigmas: Tensor, mode: str = "or", sde: bool = True,
              temperature: float = 1.0, bias: Sequence[float] | Tensor | None = None,
              generator: torch.Generator | PerSampleGenerator | None = None, probes: int = 1,
              rcond: float = DEFAULT_RCOND, noise_correction: bool = False, record: bool = False,
              callback: Callable[[int, Tensor, Tensor], None] | None = None) -> CompositionResult:
    """SuperDiff sampling from the state x at sigmas[0] to sigmas[-1] > 0 (docs/methods/superdiff.md).

    models: a `Components` (see over_models / over_conditions) or a list of denoisers.
    x: [N, ...] initial state (pure noise: sigmas[0]·z); sigmas: [S+1] strictly decreasing, positive.
    mode: "or" | "and" | "average"; sde: Euler–Maruyama on the reverse SDE with the Itô estimator
    (no extra model calls), else Euler on the ODE with a Hutchinson divergence (`probes` Rademacher
    probes per step, one JVP call each). temperature: T of OR; bias: ℓ [M] (OR: added to the
    logits; AND: a rate per unit log σ; average: the fixed log-weights). generator: the SDE noise and
    the probes (a PerSampleGenerator makes samples independent of the batch size).
    noise_correction (AND with the SDE): add the Itô term of the noise AND's κ cancels (compose/ito.py),
    at M−1 extra JVP calls per step; without it (the paper's algorithm) the estimates of all models
    share a bias that does not shrink with more steps (the exact densities still end up near-equal).
    callback(i, x, log_q) after each step. Raises NonFiniteError on NaN/inf.
    """
    components = models if isinstance(models, Components) else Components.over_models(models)
    m = components.num_models
    sigmas, bias_t = _validate(components, x, sigmas, mode, temperature, bias, probes, rcond, m)
    n = x.shape[0]
    log_q = torch.zeros(n, m, dtype=torch.float64, device=x.device)
    guarded_steps = torch.zeros(n, dtype=torch.long, device=x.device)
    kappa = average_kappa(n, bias_t).to(x.device)
    calls = 0
    path = {"x": [x.detach().cpu()], "log_q": [log_q.cpu()], "kappa": []} if record else None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
        h = sigma - sigma_next                                   # |dσ| > 0: σ decreases
        step = (_sde_step(components, x, sigma, h, generator, mode == "and" and noise_correction, rcond) if sde
                else _ode_step(components, x, sigma, h, generator, probes))
        calls += step.calls
        if mode == "or":
            kappa = or_kappa(log_q, temperature, bias_t)
        elif mode == "and":
            A = drift_matrix(step.eps, step.c, step.drift_scale, sigma)
            kappa, guarded = and_kappa(A, step.increment_at_zero - bias_t.to(log_q) * h / sigma, rcond)
            guarded_steps += guarded.long()
        field_mix = mix(kappa, step.c0, step.c)
        x = x + step.drift_scale * field_mix + step.noise
        log_q = log_q + step.increment(field_mix)
        _check_finite(x, log_q, kappa, i, sigma, sigma_next)
        if record:
            path["x"].append(x.detach().cpu())
            path["log_q"].append(log_q.cpu())
            path["kappa"].append(kappa.cpu())
        if callback:
            callback(i, x, log_q)
    trajectory = None
    if record:
        trajectory = Trajectory(sigmas.cpu(), torch.stack(path["x"]), torch.stack(path["log_q"]),
                                torch.stack(path["kappa"]))
    return CompositionResult(x, log_q, kappa, guarded_steps, calls, trajectory)


@dataclass
class _Step:
    """One step's pieces: the models' ε̂ [M, N, ...], the field basis (c_0, c), dx = drift_scale·field
    + noise, the log-density increment as a function of the field, and its value at κ = 0 (field c_0)."""

    eps: Tensor
    c0: Tensor | None
    c: Tensor
    drift_scale: float
    noise: Tensor | float
    increment: Callable[[Tensor], Tensor]
    increment_at_zero: Tensor
    calls: int


def _calls_per_evaluation(components: Components) -> int:
    return 1 if components.batched else components.num_models + int(components.w is not None)


def _sde_step(components: Components, x: Tensor, sigma: float, h: float, generator, noise_correction: bool,
              rcond: float) -> _Step:
    """Euler–Maruyama: dx = 2·dσ·field + ξ, ξ = sqrt(2σh)·z; Δ log q_i by the Itô estimator."""
    evaluation = components.evaluate(x, sigma)
    xi = math.sqrt(2 * sigma * h) * randn_like(x, generator)              # the step's noise, drawn once
    c0, c = field_basis(evaluation.eps, evaluation.eps_uncond, components.w)
    drift_scale = -2 * h                                                   # 2·dσ
    calls = _calls_per_evaluation(components)
    correction = 0.0                                                       # AND's cancelled noise
    if noise_correction and components.num_models > 1:
        correction = _and_noise_correction(components, x, sigma, h, evaluation.eps, rcond)
        calls *= components.num_models

    def increment(field: Tensor) -> Tensor:
        return ito_increment(drift_scale * field + xi, evaluation.eps, sigma, h) + correction

    at_zero = increment(c0 if c0 is not None else torch.zeros_like(x))
    return _Step(evaluation.eps, c0, c, drift_scale, xi, increment, at_zero, calls)


def _ode_step(components: Components, x: Tensor, sigma: float, h: float, generator, probes: int) -> _Step:
    """Euler on dx/dσ = field; Δ log q_i by the continuity equation with a Hutchinson divergence."""
    evaluation, divergence = _evaluate_with_divergence(components, x, sigma, generator, probes)
    c0, c = field_basis(evaluation.eps, evaluation.eps_uncond, components.w)

    def increment(field: Tensor) -> Tensor:
        return ode_increment(field, evaluation.eps, divergence, sigma, h)

    at_zero = increment(c0 if c0 is not None else torch.zeros_like(x))
    return _Step(evaluation.eps, c0, c, -h, 0.0, increment, at_zero, _calls_per_evaluation(components) * probes)


def _evaluate_with_divergence(components: Components, x: Tensor, sigma: float, generator, probes: int):
    """ε̂_i and the Hutchinson estimate of ∇·ε̂_i, averaged over `probes` Rademacher probes. -> (Evaluation, [M, N])."""
    sample_ndim = x.ndim - 1
    total = None
    for _ in range(probes):
        probe = rademacher(lambda: randn_like(x, generator))
        evaluation = components.evaluate(x, sigma, probe=probe)
        estimate = hutchinson(evaluation.jvp, probe, sample_ndim)       # zᵀ J_i z   [M, N]
        total = estimate if total is None else total + estimate
    return evaluation, total / probes


def _and_noise_correction(components: Components, x: Tensor, sigma: float, h: float, eps_models: Tensor,
                          rcond: float) -> Tensor:
    """h·Σ_k u_kᵀ J_i u_k over an orthonormal basis u_k of span{ε̂_j − ε̂_M} (the left singular vectors
    whose singular values exceed sqrt(rcond) × the largest, as the AND guard resolves). -> [N, M]."""
    differences = (eps_models[:-1] - eps_models[-1:]).flatten(2).double()           # [M−1, N, D]
    U, S, _ = torch.linalg.svd(differences.permute(1, 2, 0), full_matrices=False)    # U: [N, D, M−1]
    resolved = math.sqrt(rcond) * S[:, :1] < S
    basis = (U * resolved[:, None, :]).permute(2, 0, 1).reshape(-1, *x.shape).to(x.dtype)   # [M−1, N, ...]
    jvps = torch.stack([components.evaluate(x, sigma, probe=u).jvp for u in basis])
    return projected_noise_correction(jvps, basis, h)


def _validate(components: Components, x: Tensor, sigmas, mode: str, temperature: float, bias, probes: int,
              rcond: float, m: int) -> tuple[Tensor, Tensor]:
    if mode not in MODES:
        raise UnknownNameError(f"unknown composition mode {mode!r}; choose one of {list(MODES)}")
    sigma_min, sigma_max = components.sigma_range
    sigmas = check_grid(torch.as_tensor(sigmas, dtype=torch.float64), sigma_min, sigma_max)
    if float(sigmas[-1]) <= 0:
        raise SigmaRangeError("composition tracks log q_σ, which needs σ > 0: end the grid at a positive "
                              "sigma_min (e.g. get_sigmas('karras', n, 0.002, 80)), without an appended zero")
    if not math.isfinite(temperature):
        raise ConfigError(f"temperature must be finite, got {temperature}")
    if int(probes) != probes or probes < 1:
        raise ConfigError(f"probes must be a positive integer, got {probes}")
    if not 0 < rcond < 1:
        raise ConfigError(f"rcond must lie in (0, 1), got {rcond}")
    bias_t = torch.zeros(m, dtype=torch.float64) if bias is None else torch.as_tensor(bias, dtype=torch.float64)
    if bias_t.shape != (m,) or bool(torch.isnan(bias_t).any()):
        raise ConfigError(f"bias must hold one number per model ({m}), got {bias_t.tolist()}")
    if mode == "and" and not bool(torch.isfinite(bias_t).all()):
        raise ConfigError(f"an AND bias must be finite, got {bias_t.tolist()}")
    if x.ndim < 2:
        raise ConfigError(f"x must be a batch [N, ...], got shape {tuple(x.shape)}")
    components.check_shape(x)
    return sigmas, bias_t.to(x.device)


def _check_finite(x: Tensor, log_q: Tensor, kappa: Tensor, i: int, sigma: float, sigma_next: float) -> None:
    for name, value in (("x", x), ("log_q", log_q), ("kappa", kappa)):
        if not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"SuperDiff produced a non-finite {name} at step {i} (sigma {sigma:.4g} -> "
                                 f"{sigma_next:.4g}); check the models' outputs")
