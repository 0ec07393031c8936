"""AMED-Solver: one learned intermediate time per step (Zhou et al., CVPR 2024, arXiv 2312.00094).

Each step t_cur → t_next evaluates the ODE direction once more at a learned point
s = t_next^r · t_cur^{1−r} between the two, and a tiny predictor g_φ(h, t_cur, t_next) -> (r, c, a)
chooses that point per sample and per step from the denoiser's pooled bottleneck feature h
(docs/methods/amed.md (1)–(6)). With r = ½, c = 1, a = 1 the step is DPM-Solver-2.

The predictor (`AMEDPredictor`, 8,971 parameters at the defaults):

    h [B, C, H, W] ─ mean over C ─ adaptive avg pool 8×8 ─ [B, 64]      ([B, H]: avg pool to 64;
                                                                          no feature: zeros)
      ─ Linear(64→128) ─ SiLU ─ Linear(128→4)                  -> [B, 4]      8,320 + 516
    ln t_cur, ln t_next ─ sinusoidal(8) ─ shared Linear(8→8) ─ SiLU   -> 2 × [B, 8]     72
    concat [B, 20] ─ Linear(20→3) ─ heads                        -> r, c, a         63
      r = sigmoid(·);  c = 1 − δ_c + 2δ_c·sigmoid(·);  a = 1 − δ_a + 2δ_a·sigmoid(·)

For a black-box denoiser (no `last_feature`) h = 0 and the feature branch is a constant, so the
predictor reduces to learned per-step constants through the time embeddings.

The predictor is an add-on bound to one base model and one NFE: its config names the base model by
its fingerprint (`difflab.core.fingerprint`) and `amed_solver` / `load_predictor` refuse a mismatch with
AddonMismatchError. Fitting lives in `difflab.amed.fit`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from difflab.core.denoiser import append_dims, last_feature, sigma_batch
from difflab.core.errors import AddonMismatchError, ConfigError, ModelFormatError, ShapeError
from difflab.core.serialization import SavedModel, read_model_folder
from difflab.models import check_base_model, register_kind
from difflab.nets.embeddings import sinusoidal_embedding  # a plain Fourier embedding, no diffusion maths
from difflab.sampling.grids import check_grid, get_sigmas, points_for_nfe
from difflab.sampling.guards import finite_guard
from difflab.sampling.steps import first_eps

Callback = Callable[[int, Tensor, float], None] | None


# ----- the predictor g_φ ----------------------------------------------------------------------
@dataclass
class AMEDParams:
    """The predictor's output for one step, each [B]: where to evaluate and how to scale."""

    r: Tensor   # position of s between t_cur and t_next in log σ (s = t_next^r · t_cur^{1−r})
    c: Tensor   # scale of the step's increment
    a: Tensor   # the denoiser is evaluated at a·s


def pool_feature(feature: Tensor | None, batch_size: int, size: int = 8) -> Tensor:
    """A bottleneck feature as size² values per sample: [B, size²].

    [B, C, H, W] (or [B, C, L...]): mean over channels, adaptive average pool to size×size
    (upsampling by repetition when the feature is smaller). [B, H]: adaptive average pool of the
    vector to size². None: zeros (an AFS step, or a black-box denoiser).
    """
    if feature is None:
        return torch.zeros(batch_size, size * size)
    if feature.shape[0] != batch_size:
        raise ShapeError(f"the denoiser's last_feature has batch size {feature.shape[0]}, the state has "
                         f"{batch_size}; a wrapper that changes the batch must expose its own feature")
    feature = feature.detach().float()
    if feature.ndim == 2:
        return F.adaptive_avg_pool1d(feature[:, None, :], size * size)[:, 0]
    if feature.ndim == 4:
        return F.adaptive_avg_pool2d(feature.mean(1, keepdim=True), (size, size)).flatten(1)
    if feature.ndim >= 3:   # any other layout: channels averaged, the rest flattened and pooled
        return F.adaptive_avg_pool1d(feature.mean(1).flatten(1)[:, None, :], size * size)[:, 0]
    raise ShapeError(f"cannot pool a last_feature of shape {tuple(feature.shape)}; expected [B, H] or [B, C, ...]")


class AMEDPredictor(SavedModel, nn.Module):
    """g_φ(h, t_cur, t_next) -> (r, c, a) (docs/methods/amed.md (8); layout in the module docstring).

    feature_size: h is pooled to feature_size² values; hidden: the feature MLP's width;
    time_channels: sinusoidal channels of each time (and the shared Linear's width);
    delta_c, delta_a: c ∈ [1 − δ_c, 1 + δ_c], a ∈ [1 − δ_a, 1 + δ_a].
    The remaining keywords describe what the predictor was fitted for (saved in its config and
    checked by `amed_solver` / `load_predictor`): base_model (a fingerprint), nfe, grid, rho,
    sigma_min, sigma_max, afs, base_solver, teacher, M; on a learned grid (grid "learned") also its σ's
    (`sigmas`, a list) and the LearnedGrid's fingerprint (`grid_model`).
    """

    def __init__(self, feature_size: int = 8, hidden: int = 128, time_channels: int = 8,
                 delta_c: float = 0.01, delta_a: float = 0.0, *, base_model: str | None = None,
                 nfe: int | None = None, grid: str | None = None, rho: float = 7.0,
                 sigma_min: float | None = None, sigma_max: float | None = None, afs: bool = True,
                 base_solver: str = "amed", teacher: str | None = None, M: int | None = None,
                 sigmas: list[float] | None = None, grid_model: str | None = None):
        super().__init__()
        if time_channels < 2 or time_channels % 2:
            raise ConfigError(f"time_channels must be even and >= 2, got {time_channels}")
        if not (0 <= delta_c < 1 and 0 <= delta_a < 1):
            raise ConfigError(f"need 0 <= delta_c, delta_a < 1, got delta_c={delta_c}, delta_a={delta_a}")
        self.feature_size, self.hidden, self.time_channels = feature_size, hidden, time_channels
        self.delta_c, self.delta_a = float(delta_c), float(delta_a)
        self.fitted_for = {"base_model": base_model, "nfe": nfe, "grid": grid, "rho": rho,
                           "sigma_min": sigma_min, "sigma_max": sigma_max, "afs": afs,
                           "base_solver": base_solver, "teacher": teacher, "M": M,
                           "sigmas": None if sigmas is None else [float(s) for s in sigmas], "grid_model": grid_model}
        self.feature_in = nn.Linear(feature_size * feature_size, hidden)
        self.feature_out = nn.Linear(hidden, 4)
        self.time_proj = nn.Linear(time_channels, time_channels)     # shared by t_cur and t_next
        self.head = nn.Linear(4 + 2 * time_channels, 3)               # -> logits of r, c, a
        # zero head: a fresh predictor gives r = ½, c = 1, a = 1, i.e. the base solver on the log-midpoint grid,
        # so fitting starts from the base solver (AMED-Solver: DPM-Solver-2) instead of a random point
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def nfe(self) -> int | None:
        return self.fitted_for["nfe"]

    @property
    def base_model(self) -> str | None:
        return self.fitted_for["base_model"]

    def _time_embedding(self, sigma: Tensor) -> Tensor:
        features = sinusoidal_embedding(sigma.log(), self.time_channels, max_period=100.0)
        return F.silu(self.time_proj(features.to(self.time_proj.weight.dtype)))

    def forward(self, feature: Tensor | None, sigma_cur: Tensor, sigma_next: Tensor) -> AMEDParams:
        """feature: the denoiser's last_feature (or None); sigma_cur, sigma_next: [B] (> 0).

        Returns AMEDParams of [B] tensors in sigma_cur's dtype.
        """
        weight = self.feature_in.weight
        pooled = pool_feature(feature, sigma_cur.shape[0], self.feature_size).to(weight.device, weight.dtype)
        h = self.feature_out(F.silu(self.feature_in(pooled)))                          # [B, 4]
        t_cur = self._time_embedding(sigma_cur.to(weight.device))                        # [B, 8]
        t_next = self._time_embedding(sigma_next.to(weight.device))                      # [B, 8]
        logits = self.head(torch.cat([h, t_cur, t_next], dim=1)).to(sigma_cur.dtype)    # [B, 3]
        gate = logits.sigmoid()
        r = gate[:, 0]
        c = 1 - self.delta_c + 2 * self.delta_c * gate[:, 1]
        a = 1 - self.delta_a + 2 * self.delta_a * gate[:, 2]
        return AMEDParams(r, c, a)

    # ----- on disk ------------------------------------------------------------------------
    def config(self) -> dict:
        return {"class": "AMEDPredictor", "kind": "addon", "feature_size": self.feature_size,
                "hidden": self.hidden, "time_channels": self.time_channels, "delta_c": self.delta_c,
                "delta_a": self.delta_a, **self.fitted_for}

    @classmethod
    def from_folder(cls, config: dict, tensors: dict[str, Tensor], path: Path) -> "AMEDPredictor":
        """Rebuild from a folder's (config, tensors); the loader `difflab.load` dispatches here."""
        keys = ("feature_size", "hidden", "time_channels", "delta_c", "delta_a", "base_model", "nfe", "grid",
                "rho", "sigma_min", "sigma_max", "afs", "base_solver", "teacher", "M", "sigmas", "grid_model")
        try:
            predictor = cls(**{k: config[k] for k in keys if k in config})
            predictor.load_state_dict(tensors)
            if "fit" in config:    # the AMEDConfig it was fitted with (amed.fit sets it)
                predictor.fitted_for["fit"] = config["fit"]
        except (TypeError, ValueError, RuntimeError, ConfigError) as err:
            raise ModelFormatError(f"{path} is not a valid AMEDPredictor ({err})") from err
        return predictor.eval().requires_grad_(False)


class ConstantPredictor(nn.Module):
    """Fixed (r, c, a) for every sample and step; r = ½, c = 1, a = 1 gives DPM-Solver-2."""

    def __init__(self, r: float = 0.5, c: float = 1.0, a: float = 1.0):
        super().__init__()
        self.r, self.c, self.a = r, c, a
        self.fitted_for: dict = {}

    def forward(self, feature: Tensor | None, sigma_cur: Tensor, sigma_next: Tensor) -> AMEDParams:
        full = lambda v: torch.full_like(sigma_cur, v)  # noqa: E731
        return AMEDParams(full(self.r), full(self.c), full(self.a))


def amed_nfe(n_points: int, to_zero: bool = False, afs: bool = True) -> int:
    """Model evaluations of `amed_solver` on a grid of n points: 2(N−1), minus 1 with AFS, minus 1
    if the grid ends at σ = 0 (that last step is Euler, x ← D(x; t_cur))."""
    return max(2 * (n_points - 1) - int(afs) - int(to_zero), 0)


def check_predictor(predictor: nn.Module, denoiser: Any = None, sigmas: Tensor | None = None,
                    afs: bool | None = None, base_model: Any = None, nfe: int | None = None,
                    base_solver: str | None = None) -> None:
    """Raise AddonMismatchError unless the predictor was fitted for this base model, budget and base solver.

    The base model is given as a denoiser, a folder or a fingerprint string (`base_model`), or taken
    from `denoiser`; the NFE directly or from (sigmas, afs); base_solver: the solver it is about to
    drive ('amed' and 'dpm2' both name AMED-Solver). Fields the predictor does not record (None)
    are not checked.
    """
    fitted = getattr(predictor, "fitted_for", {}) or {}
    canonical = lambda name: "dpm2" if name == "amed" else name  # noqa: E731
    if base_solver is not None and fitted.get("base_solver") is not None and \
            canonical(base_solver) != canonical(fitted["base_solver"]):
        raise AddonMismatchError(f"this AMED predictor was fitted for base solver {fitted['base_solver']!r}, asked "
                                 f"to drive {base_solver!r}; fit one for that solver (difflab amed fit --base-solver)")
    check_base_model("AMED predictor", fitted.get("base_model"), base_model if base_model is not None else denoiser,
                     "fit one for this model (difflab.amed.fit_amed)")
    if sigmas is not None:
        to_zero = float(sigmas[-1]) == 0
        nfe = amed_nfe(len(sigmas), to_zero, fitted.get("afs", True) if afs is None else afs)
    if fitted.get("nfe") is not None and nfe is not None and nfe != fitted["nfe"]:
        raise AddonMismatchError(f"this AMED predictor was fitted for NFE {fitted['nfe']}, asked to run with NFE "
                                 f"{nfe}; use its grid ({amed_points(fitted['nfe'], fitted.get('afs', True))} "
                                 "points) or fit a predictor for this NFE")
    if sigmas is not None and fitted.get("sigmas") is not None:          # fitted on a learned grid: exactly its σ's
        expected = torch.tensor(fitted["sigmas"], dtype=torch.float64)
        given = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        if given.shape != expected.shape or not torch.allclose(given, expected, rtol=1e-5, atol=0):
            raise AddonMismatchError(
                f"this AMED predictor was fitted on a learned grid {[round(float(s), 4) for s in expected]}, got "
                f"sigmas {[round(float(s), 4) for s in given]}; use predictor_sigmas(predictor)")
    elif sigmas is not None and fitted.get("grid") is not None and None not in (fitted.get("sigma_min"),
                                                                                fitted.get("sigma_max")):
        expected = get_sigmas(fitted["grid"], len(sigmas), fitted["sigma_min"], fitted["sigma_max"],
                              fitted.get("rho", 7.0))
        if not torch.allclose(torch.as_tensor(sigmas, dtype=torch.float64).cpu(), expected, rtol=1e-5, atol=0):
            raise AddonMismatchError(
                f"this AMED predictor was fitted on the {fitted['grid']!r} grid from {fitted['sigma_max']} to "
                f"{fitted['sigma_min']}, got sigmas {[round(float(s), 4) for s in sigmas]}; use "
                "predictor_sigmas(predictor) or fit a predictor for this grid")


def amed_points(nfe: int, afs: bool = True) -> int:
    """The grid size N at which AMED-Solver spends exactly `nfe` evaluations (NFE 3,5,7,9 ↔ N 3,4,5,6)."""
    return points_for_nfe(nfe, lambda n: amed_nfe(n, False, afs), "amed")


def predictor_sigmas(predictor: nn.Module) -> Tensor:
    """The grid a fitted predictor was fitted on (a learned grid's recorded σ's, or its family's): [N] float64."""
    f = predictor.fitted_for
    if f.get("sigmas") is not None:
        return torch.tensor(f["sigmas"], dtype=torch.float64)
    if None in (f.get("nfe"), f.get("grid"), f.get("sigma_min"), f.get("sigma_max")):
        raise ConfigError("this predictor records no grid (nfe, grid, sigma_min, sigma_max); build the grid yourself")
    return get_sigmas(f["grid"], amed_points(f["nfe"], f.get("afs", True)), f["sigma_min"], f["sigma_max"],
                      f.get("rho", 7.0))


def load_predictor(path: str | Path, base_model: Any = None, nfe: int | None = None,
                   device: str | torch.device = "cpu") -> AMEDPredictor:
    """Load a saved predictor, refusing (AddonMismatchError) one fitted for another base model
    (a denoiser, folder or fingerprint) or another NFE."""
    config, tensors = read_model_folder(Path(path))
    if config.get("class") != "AMEDPredictor":
        raise ModelFormatError(f"{path} holds a {config.get('class')!r}, not an AMEDPredictor")
    predictor = AMEDPredictor.from_folder(config, tensors, Path(path))
    check_predictor(predictor, base_model=base_model, nfe=nfe)
    return predictor.to(device)


# ----- the solver ------------------------------------------------------------------------------
def amed_step(denoiser, x: Tensor, sigma_cur: float, sigma_next: float, predictor,
              analytic_first: bool = False, **cond: Any) -> tuple[Tensor, AMEDParams]:
    """One AMED-Solver step t_cur → t_next > 0 (docs/methods/amed.md (1)–(6)). Returns (x_next, (r, c, a)).

    x: [B, ...]; sigma_cur, sigma_next: floats. analytic_first: AFS (this is the first step).
    Differentiable in the predictor's parameters (gradients pass through the denoiser's input).
    """
    # 1. d_cur = (x − D(x; t_cur))/t_cur, or with AFS x/sqrt(1 + t_cur²) (no evaluation, h = 0)
    d_cur = first_eps(denoiser, x, sigma_cur, analytic_first, **cond)
    feature = None if analytic_first else last_feature(denoiser)       # read before the next call
    t_cur, t_next = sigma_batch(float(sigma_cur), x), sigma_batch(float(sigma_next), x)
    params = predictor(feature, t_cur, t_next)                          # 2. (r, c, a) = g_φ(h, t_cur, t_next)
    r, c, a = (append_dims(v.to(x.dtype), x.ndim) for v in (params.r, params.c, params.a))
    t_cur_b, t_next_b = append_dims(t_cur, x.ndim), append_dims(t_next, x.ndim)
    x_mid, s = amed_midpoint(x, d_cur, t_cur_b, t_next_b, r)
    # 5. d_mid = (x_mid − D(x_mid; a·s))/s: the denoiser sees a·s but the division uses s, so this is
    #    not ε̂(x_mid; a·s) (which would divide by a·s); with a = 1 the two agree.
    d_mid = (x_mid - denoiser(x_mid, (a * s).flatten(), **cond)) / s
    return amed_update(x, d_mid, t_cur_b, t_next_b, c), params


def amed_midpoint(x: Tensor, d_cur: Tensor, t_cur, t_next, r) -> tuple[Tensor, Any]:
    """Steps 3–4 of `amed_step`: s = t_next^r · t_cur^{1−r}, x_mid = x + (s − t_cur)·d_cur. Returns (x_mid, s).

    t_cur, t_next, r: floats or [B, 1, …] tensors broadcastable against x."""
    s = t_next**r * t_cur ** (1 - r)                                    # 3. geometric interpolation
    return x + (s - t_cur) * d_cur, s                                   # 4.


def amed_update(x: Tensor, d_mid: Tensor, t_cur, t_next, c) -> Tensor:
    """Step 6 of `amed_step`: x_next = x + c·(t_next − t_cur)·d_mid (x: the step's start)."""
    return x + c * (t_next - t_cur) * d_mid


def amed_solver(denoiser, x: Tensor, sigmas: Tensor, predictor, callback: Callback = None, afs: bool = True,
                check: bool = True, **cond: Any) -> Tensor:
    """AMED-Solver (Zhou et al. 2024, Alg. 1) from x at sigmas[0] down to sigmas[-1].

    x: [B, ...]; sigmas: [N] decreasing (a final 0 is reached by an Euler step, x ← D(x; t_cur)).
    predictor: g_φ(feature, t_cur [B], t_next [B]) -> AMEDParams, e.g. AMEDPredictor or
    ConstantPredictor(0.5, 1, 1) (= DPM-Solver-2). afs: analytical first step.
    NFE = 2(N−1) − afs (− 1 for a final 0): see `amed_nfe`. With check=True a predictor fitted for
    another base model, NFE or grid is refused (AddonMismatchError) before any evaluation (the
    base-model check hashes the denoiser's weights once per call; check=False skips it all).
    `callback(i, x, sigma_next)` runs after each step. Returns x at sigmas[-1].
    """
    sigmas = check_grid(sigmas, getattr(denoiser, "sigma_min", None), getattr(denoiser, "sigma_max", None))
    if check:
        check_predictor(predictor, denoiser, sigmas, afs, base_solver="dpm2")
    callback = finite_guard("amed", sigmas, callback)          # NonFiniteError names the step and σ
    sigma_list = torch.as_tensor(sigmas).tolist()
    for i, (t_cur, t_next) in enumerate(zip(sigma_list[:-1], sigma_list[1:])):
        first = afs and i == 0
        if t_next == 0:   # s = 0^r·t_cur^{1−r} = 0 is undefined: finish with Euler, x ← D(x; t_cur)
            x = x - t_cur * first_eps(denoiser, x, t_cur, first, **cond)
        else:
            x, _ = amed_step(denoiser, x, t_cur, t_next, predictor, analytic_first=first, **cond)
        callback(i, x, t_next)
    return x



register_kind("AMEDPredictor", AMEDPredictor.from_folder)

__all__ = ["AMEDParams", "AMEDPredictor", "ConstantPredictor", "pool_feature", "amed_nfe",
           "amed_points", "check_predictor", "predictor_sigmas", "load_predictor", "amed_step", "amed_midpoint",
           "amed_update", "amed_solver"]
