"""Learned time grids: GITS (Chen et al., ICML 2024), LD3 (Tong et al., ICLR 2025) and Align Your Steps
(Sabour et al., ICML 2024; its KLUB and refinement live in `difflab.amed.ays`).

All keep the solver and its NFE and move only the σ's it visits (docs/methods/grids.md):

- GITS, "On the trajectory regularity of ODE-based diffusion sampling": a few teacher trajectories
  on a fine grid of N levels, the cost c_ij of jumping from fine level i to j with one step of the
  solver, and dynamic programming for the path 0 → N−1 with exactly K jumps of least total cost
  (eq. (G2)). For multistep solvers the one-step cost is an approximation: a single step has no
  history, so it is the solver's first-order warm-up step, not the step it takes inside a run.
- LD3, "Learning to discretize denoising diffusion ODEs": K + 1 levels from unconstrained logits
  (softmax + cumulative sum in log σ, eq. (L1)), learned by backpropagating through the K-step
  solver so that its output matches the teacher's from the same noise, with the student's start
  free in a ball of radius r·σ_max around the teacher's (soft teacher forcing, eq. (L2)).
- AYS, "Align your steps": the Karras grid refined coordinate by coordinate to minimise the KL upper bound
  between the true reverse SDE and its discretisation (eqs. (A3)–(A5)), estimated with the denoiser on paths of
  the forward process from the teacher's endpoints. The bound does not depend on the solver; the held-out check
  does.

A fitted grid is a `LearnedGrid`: an add-on model (σ's, solver, NFE, method, the base model's
fingerprint) usable as `difflab.sample(model, x, grid.sigmas, solver=grid.solver)` after
`grid.check(model)`, or by `difflab sample --grid-file PATH`. Every fit reports the held-out endpoint
error of the learned grid and of Karras ρ = 7 at the same solver and NFE, and returns Karras' grid when the learned
one is not better ("never worse": an unlucky fit costs its time, never accuracy).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difflab.amed.ays import fit_ays
from difflab.amed.plugin import refined_sigmas
from difflab.core.denoiser import eps
from difflab.core.errors import ConfigError, ModelFormatError, NotImprovedWarning, warn
from difflab.core.fingerprint import fingerprint
from difflab.core.serialization import SavedModel, read_model_folder
from difflab.metrics.distances import mean_l2
from difflab.models import check_base_model, register_kind
from difflab.sampling.grids import EDM_RANGE, get_sigmas, model_sigma_range, points_for_nfe
from difflab.sampling.multistep import adams_bashforth_step, ipndm_v_weights, ipndm_weights
from difflab.sampling.registry import SOLVERS
from difflab.sampling.solvers import dpmpp_step, euler_step, heun_step
from difflab.sampling.steps import first_eps
from difflab.train.contract import FitResult, JSONConfig, Step, StepCallback

METHODS = ("gits", "ld3", "ays")
LD3_SOLVERS = ("euler", "heun", "dpm2", "ipndm", "ipndm_v", "dpmpp_2m", "dpmpp_3m")   # differentiable in σ here


@dataclass
class GridConfig(JSONConfig):
    """How to fit a grid. sigma_min / sigma_max: the range (None: the model's, clipped to [0.002, 80]); rho: the
    Karras grid compared against and GITS's fine grid; afs: analytical first step in the solver.
    Teacher: Heun on a Karras grid of (fine_levels − 1)·teacher_substeps steps. GITS: fine_levels levels.
    LD3: train_steps Adam steps at lr over n_fit noise draws, ball radius `radius` (r), a Step every log_every.
    AYS: the KLUB from the teacher's n_fit endpoints, each repeated klub_repeats times, klub_nodes Gauss–Legendre
    nodes per interval, klub_rounds rounds of klub_candidates candidates per level; early_stopping: keep the round
    whose grid gives the solver the least endpoint error on the n_fit draws (round 0: Karras).
    refine: the solver runs on the levels with each interval's log-midpoint inserted (an unfitted AMED-Plugin on
    that solver, `difflab.amed.grid_for_amed`); the K + 1 levels are what is learned and saved.
    n_fit / n_eval: noise draws to fit on / held out for the reported errors (seed and seed + 1)."""

    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    afs: bool = False
    fine_levels: int = 100
    teacher_substeps: int = 4
    n_fit: int = 64
    n_eval: int = 256
    train_steps: int = 300
    lr: float = 0.05
    radius: float = 0.1
    log_every: int = 25
    klub_nodes: int = 8
    klub_repeats: int = 4
    klub_rounds: int = 4
    klub_candidates: int = 8
    refine: bool = False
    early_stopping: bool = True
    seed: int = 0


class LearnedGrid(SavedModel, nn.Module):
    """A learned grid: sigmas [K + 1] float64 (a buffer, decreasing), the solver and NFE it was fitted for,
    the method ("gits" / "ld3" / "ays"), the base model's fingerprint, afs, and metrics (held-out endpoint errors:
    "base_error" of Karras ρ = 7, "learned_error" of the optimised grid). improved: False when the optimised grid
    was no better than Karras, and these σ's are Karras' ("never worse")."""

    def __init__(self, sigmas: Tensor, solver: str, nfe: int, method: str, base_model: str | None = None,
                 afs: bool = False, metrics: dict[str, float] | None = None, refine: bool = False,
                 improved: bool = True):
        super().__init__()
        self.register_buffer("sigmas", torch.as_tensor(sigmas, dtype=torch.float64).detach().clone())
        self.solver, self.nfe, self.method, self.base_model = solver, int(nfe), method, base_model
        self.afs, self.metrics, self.refine = bool(afs), dict(metrics or {}), bool(refine)
        self.improved = bool(improved)

    def config(self) -> dict:
        return {"class": "LearnedGrid", "kind": "addon", "solver": self.solver, "nfe": self.nfe,
                "method": self.method, "base_model": self.base_model, "afs": self.afs, "metrics": self.metrics,
                "refine": self.refine, "improved": self.improved}

    @classmethod
    def from_folder(cls, config: dict, tensors: dict[str, Tensor], path: Path) -> "LearnedGrid":
        try:
            keys = ("solver", "nfe", "method", "base_model", "afs", "metrics", "refine", "improved")
            return cls(tensors["sigmas"], **{k: config[k] for k in keys if k in config}).eval()
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFormatError(f"{path} is not a valid LearnedGrid ({err})") from err

    def check(self, denoiser: Any) -> Tensor:
        """The σ's the solver runs on (with `refine`, each interval's log-midpoint inserted: what AMED-Plugin with
        r = ½ runs); AddonMismatchError unless `denoiser` (or a folder, a fingerprint) is the base it was fitted for."""
        check_base_model("learned grid", self.base_model, denoiser, "fit one for this model (difflab.amed.fit_grid)")
        return solver_levels(self.sigmas, self.refine)


def load_grid(path: str | Path, base_model: Any = None) -> LearnedGrid:
    """Load a saved LearnedGrid, refusing (AddonMismatchError) one fitted for another base model."""
    config, tensors = read_model_folder(Path(path))
    if config.get("class") != "LearnedGrid":
        raise ModelFormatError(f"{path} holds a {config.get('class')!r}, not a LearnedGrid")
    grid = LearnedGrid.from_folder(config, tensors, Path(path))
    grid.check(base_model)
    return grid


register_kind("LearnedGrid", LearnedGrid.from_folder)


# ----- shared pieces: the budget, the teacher, the endpoint error ---------------------------------------
def solver_levels(sigmas: Tensor, refine: bool) -> Tensor:
    """The σ's a solver runs on: sigmas [K + 1], or with `refine` the [2K + 1] with every log-midpoint inserted."""
    return refined_sigmas(sigmas) if refine else sigmas


def grid_points(solver: str, nfe: int, afs: bool = False, refine: bool = False) -> int:
    """K + 1: the number of levels on which `solver` spends exactly `nfe` evaluations (no final σ = 0; with
    `refine`, on those levels and their log-midpoints)."""
    if solver not in SOLVERS or SOLVERS[solver].stochastic:
        raise ConfigError(f"fit_grid needs a deterministic registered solver, got {solver!r}; choose one of "
                          f"{sorted(name for name, spec in SOLVERS.items() if not spec.stochastic)}")
    return points_for_nfe(nfe, lambda n: SOLVERS[solver].nfe(2 * n - 1 if refine else n, False, afs), solver)


@torch.no_grad()
def teacher_states(denoiser, x_start: Tensor, levels: Tensor, substeps: int, rho: float = 7.0,
                   **cond: Any) -> list[Tensor]:
    """The high-accuracy ODE solution at every σ of `levels` ([N], Karras at `rho`) from x_start at levels[0]:
    Heun with `substeps` steps per interval of the refined Karras grid (whose every substeps-th σ is levels')."""
    fine = get_sigmas("karras", (len(levels) - 1) * substeps + 1, float(levels[-1]), float(levels[0]), rho)
    states = [x_start]

    def keep(i: int, x: Tensor, sigma_next: float) -> None:
        if (i + 1) % substeps == 0:
            states.append(x)

    SOLVERS["heun"].fn(denoiser, x_start, fine, callback=keep, **cond)
    return states


def endpoint_error(denoiser, solver: str, sigmas: Tensor, x_start: Tensor, target: Tensor, afs: bool,
                   **cond: Any) -> float:
    """Mean over samples of ‖solver(x_start; sigmas) − target‖₂ (x_start, target: [B, ...])."""
    with torch.no_grad():
        out = SOLVERS[solver].fn(denoiser, x_start, sigmas.to(torch.float64), afs=afs, **cond)
    return mean_l2(out, target)


# ----- GITS ---------------------------------------------------------------------------------------
def shortest_path_with_jumps(cost: Tensor, jumps: int) -> list[int]:
    """The path 0 = p_0 < p_1 < … < p_jumps = N − 1 minimising Σ_k cost[p_k, p_{k+1}] (GITS, eq. (G2)).

    cost: [N, N], used above the diagonal. Dynamic programming over (jumps made, level reached):
    best[k, j] = min_i best[k − 1, i] + cost[i, j]. O(jumps·N²)."""
    n = cost.shape[0]
    if not 1 <= jumps <= n - 1:
        raise ConfigError(f"cannot reach level {n - 1} from 0 in {jumps} strictly increasing jumps")
    upper = torch.full((n, n), math.inf, dtype=torch.float64).triu(1).isinf()
    cost = torch.where(upper, cost.to(torch.float64), torch.full_like(cost, math.inf, dtype=torch.float64))
    best = torch.full((jumps + 1, n), math.inf, dtype=torch.float64)
    best[0, 0] = 0.0
    came_from = torch.zeros((jumps + 1, n), dtype=torch.long)
    for k in range(1, jumps + 1):
        totals = best[k - 1][:, None] + cost                     # [i, j]: reach i in k − 1 jumps, then i → j
        best[k], came_from[k] = totals.min(dim=0)
    path = [n - 1]
    for k in range(jumps, 0, -1):
        path.append(int(came_from[k, path[-1]]))
    return path[::-1]


@torch.no_grad()
def gits_costs(denoiser, solver: str, levels: Tensor, states: list[Tensor], afs: bool, refine: bool = False,
               **cond: Any) -> Tensor:
    """c_ij = mean_b ‖one solver step from the teacher's x_i (σ_i → σ_j) − teacher's x_j‖₂ (GITS, eq. (G1)): [N, N]."""
    n = len(levels)
    cost = torch.full((n, n), math.inf, dtype=torch.float64)
    step = SOLVERS[solver].fn
    for i in range(n - 1):
        for j in range(i + 1, n):
            x_j = step(denoiser, states[i], solver_levels(levels[[i, j]], refine), afs=afs and i == 0, **cond)
            cost[i, j] = (x_j - states[j]).flatten(1).norm(dim=1).mean()
    return cost


def _fit_gits(denoiser, solver: str, n_points: int, levels: Tensor, states: list[Tensor], config: GridConfig,
              **cond: Any) -> Tensor:
    cost = gits_costs(denoiser, solver, levels, states, config.afs, config.refine, **cond)
    return levels[shortest_path_with_jumps(cost, n_points - 1)]


# ----- LD3 ----------------------------------------------------------------------------------------
def logits_to_sigmas(logits: Tensor, sigma_min: float, sigma_max: float) -> Tensor:
    """LD3's grid (eq. (L1)): log σ_k = log σ_max − (log σ_max − log σ_min)·Σ_{m<k} softmax(θ)_m, k = 0..K.

    logits θ: [K]. Returns [K + 1], strictly decreasing, exactly σ_max first and σ_min last."""
    fractions = torch.cat([logits.new_zeros(1), torch.softmax(logits, 0).cumsum(0)])
    log_sigmas = math.log(sigma_max) - (math.log(sigma_max) - math.log(sigma_min)) * fractions
    inner = log_sigmas[1:-1].exp()                               # the ends are set exactly, free of round-off
    return torch.cat([inner.new_tensor([sigma_max]), inner, inner.new_tensor([sigma_min])])


def sigmas_to_logits(sigmas: Tensor) -> Tensor:
    """The logits whose grid (`logits_to_sigmas`) is `sigmas` [K + 1]: log of the log σ increments."""
    return (-torch.diff(sigmas.to(torch.float64).log())).log()


def student_solve(denoiser, x: Tensor, sigmas: Tensor, solver: str, afs: bool = False, **cond: Any) -> Tensor:
    """`solver` (one of LD3_SOLVERS) from x at sigmas[0] to sigmas[-1], differentiable in the σ's [K + 1]:
    the registered solvers' own step functions, called with 0-d tensor σ's (equal to SOLVERS[solver] to round-off)."""
    sigma_list = list(sigmas.unbind(0))
    n_steps = len(sigma_list) - 1
    history: list = []
    for i in range(n_steps):
        sigma, sigma_next = sigma_list[i], sigma_list[i + 1]
        analytic = afs and i == 0                                    # AFS: σ_0 = σ_max is fixed, no gradient
        d = first_eps(denoiser, x, sigma.detach() if analytic else sigma, analytic, **cond)   # 0-d σ: grad via `eps`
        if solver in ("euler", "heun"):
            x_next = euler_step(x, sigma, sigma_next, d)
            x = heun_step(x, sigma, sigma_next, d, eps(denoiser, x_next, sigma_next, **cond)) \
                if solver == "heun" else x_next
        elif solver == "dpm2":                                        # the slope at the log-midpoint s
            s = (sigma * sigma_next).sqrt()
            x = euler_step(x, sigma, sigma_next, eps(denoiser, euler_step(x, sigma, s, d), s, **cond))
        elif solver in ("ipndm", "ipndm_v"):
            history = [d] + history[:3]
            weights = ipndm_weights if solver == "ipndm" else ipndm_v_weights
            x = adams_bashforth_step(x, sigma_list, i, history, weights)
        else:
            history = (history + [(sigma, x - sigma * d)])[-3:]
            x = dpmpp_step(x, sigma, sigma_next, history, 3 if solver == "dpmpp_3m" else 2, i, n_steps)
    return x


def _fit_ld3(denoiser, solver: str, n_points: int, x_start: Tensor, target: Tensor, sigma_min: float,
             sigma_max: float, config: GridConfig, callback: StepCallback | None, **cond: Any) -> tuple[Tensor, list]:
    """Adam on (θ, δ): min ‖student(x_T + δ; σ(θ)) − teacher(x_T)‖² with ‖δ_b‖ ≤ r·σ_max (LD3, eq. (L2))."""
    karras = get_sigmas("karras", n_points, sigma_min, sigma_max, config.rho)
    logits = sigmas_to_logits(karras).requires_grad_(True)
    offset = torch.zeros_like(x_start, requires_grad=True)
    optimiser = torch.optim.Adam([logits, offset], lr=config.lr)
    radius = config.radius * sigma_max
    history, started, running = [], time.perf_counter(), []
    for step in range(1, config.train_steps + 1):
        sigmas = logits_to_sigmas(logits, sigma_min, sigma_max).to(x_start.dtype)
        out = student_solve(denoiser, x_start + offset, solver_levels(sigmas, config.refine), solver, config.afs,
                            **cond)
        loss = (out - target).square().flatten(1).sum(1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():                                    # project δ back into the ball
            norms = offset.flatten(1).norm(dim=1).clamp_min(1e-30)
            offset.mul_((radius / norms).clamp(max=1.0).view(-1, *[1] * (offset.ndim - 1)))
        running.append(loss.item())
        if step % config.log_every == 0 or step == config.train_steps:
            history.append((step, sum(running) / len(running)))
            if callback:
                callback(Step(step, config.train_steps, history[-1][1], config.lr, time.perf_counter() - started))
            running = []
    return logits_to_sigmas(logits.detach(), sigma_min, sigma_max), history


# ----- the entry point ------------------------------------------------------------------------------
def fit_grid(denoiser, solver: str, nfe: int, method: str = "gits", config: GridConfig = GridConfig(), *,
             callback: StepCallback | None = None, **cond: Any) -> FitResult[LearnedGrid]:
    """Fit a grid of K + 1 levels on which `solver` spends exactly `nfe` evaluations (method "gits", "ld3", "ays").

    Returns FitResult: model the LearnedGrid (with .metrics: held-out endpoint errors of Karras ρ = 7 and of the
    learned grid, vs the teacher from n_eval fresh noise draws), history [(step, loss)] (LD3; AYS: [(round,
    KLUB)]; [] for GITS),
    timings ("teacher", "fit", "eval", "total"). Never worse: when the learned grid is not better than Karras on the
    held-out draws, the returned grid holds Karras' σ's (improved=False) and a NotImprovedWarning says so."""
    if method not in METHODS:
        raise ConfigError(f"unknown grid method {method!r}; choose one of {list(METHODS)}")
    if method == "ld3" and solver not in LD3_SOLVERS:
        raise ConfigError(f"LD3 backpropagates through the solver; supported: {list(LD3_SOLVERS)}, got {solver!r}")
    started = time.perf_counter()
    n_points = grid_points(solver, nfe, config.afs, config.refine)
    sigma_min, sigma_max = model_sigma_range(denoiser, config.sigma_min, config.sigma_max, default=EDM_RANGE)
    levels = get_sigmas("karras", config.fine_levels, sigma_min, sigma_max, config.rho)
    x_fit = _noise(denoiser, config.n_fit, config.seed, sigma_max)
    x_eval = _noise(denoiser, config.n_eval, config.seed + 1, sigma_max)      # held out
    states = teacher_states(denoiser, x_fit, levels, config.teacher_substeps, config.rho, **cond)
    timings = {"teacher": time.perf_counter() - started}
    history: list = []
    karras = get_sigmas("karras", n_points, sigma_min, sigma_max, config.rho)    # the base every fit must beat
    if method == "gits":
        sigmas = _fit_gits(denoiser, solver, n_points, levels.to(x_fit.dtype), states, config, **cond)
    elif method == "ays":
        x_low = states[-1].repeat(config.klub_repeats, *[1] * (states[-1].ndim - 1))
        fit_error = lambda grid: endpoint_error(denoiser, solver, solver_levels(grid, config.refine), x_fit,  # noqa: E731
                                                states[-1], config.afs, **cond)
        sigmas, history = fit_ays(denoiser, karras, x_low, sigma_min, config.klub_nodes, config.klub_rounds,
                                  config.klub_candidates, config.seed, fit_error if config.early_stopping else None,
                                  **_repeat_cond(cond, config.klub_repeats))
    else:
        sigmas, history = _fit_ld3(denoiser, solver, n_points, x_fit, states[-1], sigma_min, sigma_max, config,
                                   callback, **cond)
    timings["fit"] = time.perf_counter() - started - timings["teacher"]
    metrics = _held_out_errors(denoiser, solver, sigmas, karras, x_eval, levels, config, **cond)
    improved = metrics["learned_error"] < metrics["base_error"]
    if not improved:
        warn(f"the {method} grid for {solver} at NFE {nfe} is not better than Karras ρ={config.rho} on "
             f"held-out noise ({metrics['learned_error']:.4g} vs {metrics['base_error']:.4g}); the "
             "returned grid is Karras'", NotImprovedWarning)
    grid = LearnedGrid(sigmas if improved else karras, solver, nfe, method, fingerprint(denoiser), config.afs, metrics,
                       config.refine, improved)
    timings["eval"] = time.perf_counter() - started - timings["teacher"] - timings["fit"]
    timings["total"] = time.perf_counter() - started
    return FitResult(grid, history, timings)


def _held_out_errors(denoiser, solver: str, sigmas: Tensor, karras: Tensor, x_eval: Tensor, levels: Tensor,
                     config: GridConfig, **cond: Any) -> dict[str, float]:
    """Endpoint errors on the held-out draws of the learned grid ("learned_error") and of Karras ("base_error")."""
    target = teacher_states(denoiser, x_eval, levels[[0, -1]], (config.fine_levels - 1) * config.teacher_substeps,
                            config.rho, **cond)[-1]
    levels_of = lambda grid: solver_levels(grid, config.refine)  # noqa: E731
    return {"base_error": endpoint_error(denoiser, solver, levels_of(karras), x_eval, target, config.afs, **cond),
            "learned_error": endpoint_error(denoiser, solver, levels_of(sigmas), x_eval, target, config.afs, **cond)}


def _noise(denoiser, n: int, seed: int, sigma_max: float) -> Tensor:
    """σ_max·z, z ~ N(0, I): [n, *data_shape] from `seed`, in the dtype of the denoiser's tensors (float32 if none)."""
    shape = getattr(denoiser, "data_shape", None)
    if shape is None:
        raise ConfigError("fit_grid needs a denoiser with a data_shape (the per-sample shape)")
    tensors = list(denoiser.parameters()) + list(denoiser.buffers()) if isinstance(denoiser, nn.Module) else []
    floats = [t for t in tensors if t.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.float32
    dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *shape), generator=generator, dtype=dtype)
    return (sigma_max * z).to(floats[0].device if floats else "cpu")



def _repeat_cond(cond: dict, times: int) -> dict:
    """Tensor conditioning repeated along the batch (the KLUB's repeated endpoints)."""
    return {k: v.repeat(times, *[1] * (v.ndim - 1)) if isinstance(v, Tensor) and v.ndim else v for k, v in cond.items()}
