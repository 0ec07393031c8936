"""Fitting an AMED predictor (Zhou et al., CVPR 2024; docs/methods/amed.md (10)–(11)) on the shared loop.

For each batch of trajectories: x_T = σ_max·z; a teacher (Heun) integrates, without gradients, the
same grid family with (M+1)(N−1)+1 points, and every (M+1)-th state is kept, so the teacher lands
exactly on the student's N points. Then for each of the N−1 intervals in turn: one student step
(AMED-Solver, or AMED-Plugin on a base solver), loss Σ‖x_student − x_teacher(t_{i+1})‖² (mean over
the batch), one Adam step. One-step students (dpm2 = AMED-Solver, euler) start each interval from
the teacher's state at t_i (teacher forcing); multistep ones (ipndm, dpmpp_2m/3m, unipc) continue
from their own previous state and history (continuation), cut from the graph between intervals.
The denoiser is frozen; gradients reach r (and a) through its input.

Mapping onto `difflab.train.loop.fit`: one fit step = one interval of one batch, so
train_steps = batches × (N−1); step k (which `fit` passes to the loss) trains interval k mod (N−1) of
batch k // (N−1). The batch's noise (and conditioning) come from a generator that is a pure
function of (seed, batch, rank, micro-batch).
The teacher trajectory is cached for the batch's N−1 steps and regenerated on a resume that lands
mid-batch, so a resumed fit equals an uninterrupted one; with a continuation student, checkpoints
are kept at batch boundaries (checkpoint_every rounded up to a multiple of N−1), where the
student's state starts afresh, so that holds there too.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from difflab.amed.grids import GridConfig, LearnedGrid, fit_grid
from difflab.amed.plugin import ONE_STEP_BASES, PLUGIN_BASES, PluginState, amed_plugin, check_base, plugin_interval
from difflab.amed.predictor import AMEDPredictor, ConstantPredictor, amed_points, amed_step
from difflab.core.errors import ConfigError, NotImprovedWarning, warn
from difflab.core.fingerprint import fingerprint
from difflab.metrics.distances import mean_l2
from difflab.sampling.grids import EDM_RANGE, get_sigmas, model_sigma_range
from difflab.sampling.registry import SOLVERS
from difflab.sampling.sample import sample, sigmas_for_nfe
from difflab.train.contract import FitResult, StepCallback
from difflab.train.loop import TrainConfig, fit, make_accelerator

CondSampler = Callable[[torch.Generator, int], dict[str, Any]]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class AMEDConfig(TrainConfig):
    """An AMED fit: the loop's settings with AMED's defaults (Adam lr 5e−3, no warm-up, no clipping, no
    EMA, full precision: the predictor is tiny) plus the method's own.

    nfe: evaluations to fit for (AFS: 3, 5, 7, 9 ↔ N = 3, 4, 5, 6 grid points); grid, rho: the grid
    family; sigma_min/max: default the denoiser's range clipped to EDM's [0.002, 80]
    (`model_sigma_range`; a range outside the model's is refused); teacher_solver: a registered
    deterministic solver run on (M+1)(N−1)+1 points; trajectories,
    batch_size: teacher trajectories in all and per batch; base_solver: "dpm2" (AMED-Solver) or the
    AMED-Plugin base (euler, ipndm, dpmpp_2m, dpmpp_3m, unipc); delta_c, delta_a: the ranges of c and
    a; dtype: of the trajectories ("float32" or "float64"). train_steps 0 (the default): derived,
    ceil(trajectories / batch_size)·(N−1); a positive value is used as given (batches continue).
    heldout: trajectories (from a seed disjoint from training) on which the endpoint error is measured
    every eval_every steps (0: about ten checks; rounded up to whole batches), the first check being
    the base solver itself; the best state seen is the one returned. The held-out reference is the
    teacher solver with max(heldout_substeps, M + 1) steps per interval: finer than the training
    teacher, so "better" means closer to the ODE solution, not to a teacher that may itself be worse
    than the base solver.
    r_search: candidate r values for AMED-Solver's warm start (`warm_start`; 0: none, start at r = ½).
    """

    train_steps: int = 0
    lr: float = 5e-3
    warmup_steps: int = 0
    ema_decay: float = 0.0
    grad_clip: float = 0.0
    mixed_precision: str = "no"
    checkpoint_every: int = 1000
    log_every: int = 10
    nfe: int = 5
    grid: str = "karras"
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    teacher_solver: str = "heun"
    M: int = 1
    trajectories: int = 10_000
    batch_size: int = 128
    afs: bool = True
    delta_c: float = 0.01
    delta_a: float = 0.0
    base_solver: str = "dpm2"
    dtype: str = "float32"
    heldout: int = 256
    heldout_substeps: int = 16
    eval_every: int = 0
    r_search: int = 21

    def validate(self) -> None:
        if self.teacher_solver not in SOLVERS or SOLVERS[self.teacher_solver].stochastic:
            raise ConfigError(f"teacher_solver must be a deterministic registered solver, got {self.teacher_solver!r}")
        check_base(self.base_solver)
        if self.heldout < 1 or self.heldout_substeps < 1 or self.eval_every < 0 or self.r_search < 0 \
                or self.r_search == 1:
            raise ConfigError(f"need heldout >= 1, heldout_substeps >= 1, eval_every >= 0 and r_search 0 or >= 2; "
                              f"got {self.heldout}, {self.heldout_substeps}, {self.eval_every}, {self.r_search}")
        if self.M < 0 or self.trajectories < 1 or self.batch_size < 1 or self.train_steps < 0:
            raise ConfigError(f"need M >= 0, trajectories >= 1, batch_size >= 1, train_steps >= 0; got {self.M}, "
                              f"{self.trajectories}, {self.batch_size}, {self.train_steps}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        amed_points(self.nfe, self.afs)    # ConfigError for an NFE AMED cannot spend
        TrainConfig.validate(dataclasses.replace(self, train_steps=self.train_steps or 1))   # 0: derived

    def resolved(self, n_steps: int, device: str) -> "AMEDConfig":
        """This config as the fit runs it, on a grid of n_steps intervals: train_steps derived (where 0),
        checkpoints at batch boundaries for a continuation student, the device resolved."""
        train_steps = self.train_steps or math.ceil(self.trajectories / self.batch_size) * n_steps
        checkpoint_every = self.checkpoint_every
        if self.base_solver not in ONE_STEP_BASES:   # batch boundaries: the student's own state starts afresh
            checkpoint_every = math.ceil(checkpoint_every / n_steps) * n_steps
        batches = math.ceil(train_steps / n_steps)
        eval_every = math.ceil((self.eval_every or math.ceil(batches / 10) * n_steps) / n_steps) * n_steps
        return dataclasses.replace(self, train_steps=train_steps, checkpoint_every=checkpoint_every, device=device,
                                   eval_every=eval_every)


def batch_generator(seed: int, batch: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """The RNG of one batch of trajectories: a pure function of (seed, batch, rank, micro)."""
    digest = hashlib.blake2b(f"amed/{seed}/{batch}/{rank}/{micro}".encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") >> 1)


@torch.no_grad()
def teacher_trajectory(denoiser, x_start: Tensor, teacher_sigmas: Tensor, every: int, teacher: str = "heun",
                       **cond: Any) -> list[Tensor]:
    """The teacher's states on the student grid: [x at teacher_sigmas[0], then every `every`-th state]."""
    states = [x_start]

    def keep(i: int, x: Tensor, sigma_next: float) -> None:
        if (i + 1) % every == 0:
            states.append(x)

    SOLVERS[teacher].fn(denoiser, x_start, teacher_sigmas, callback=keep, **cond)
    return states


def fit_amed(denoiser, config: AMEDConfig = AMEDConfig(), *, cond_sampler: CondSampler | None = None,
             shape: tuple[int, ...] | None = None, out_dir: str | Path | None = None,
             callback: StepCallback | None = None, progress: bool = False,
             resume: bool = True, grid: LearnedGrid | None = None) -> FitResult[AMEDPredictor]:
    """Fit g_φ for AMED-Solver (config.base_solver "dpm2") or AMED-Plugin on another base solver, for
    `denoiser` at config.nfe evaluations (see `AMEDConfig` for every setting).

    shape: the per-sample data shape (default denoiser.data_shape); cond_sampler(generator, batch_size)
    -> cond kwargs (e.g. class labels, drawn on generator.device) for a conditional model.
    grid: a LearnedGrid (`fit_grid`, for this denoiser) of amed_points(nfe, afs) levels to fit on instead of the
    config.grid family (AMED-Plugin on learned σ's; `grid_for_amed` fits one): the teacher refines each of its
    intervals into M + 1 Karras steps, and the predictor records the σ's and the grid's fingerprint.
    The fit runs on the denoiser's device (config.device "auto"); an explicit other device is an
    error. The denoiser's parameters are frozen during the fit (requires_grad is restored after).
    Returns a FitResult: model = the fitted predictor (eval mode, frozen; the resolved config under
    "fit" in its config.json), timings "total" and "teacher" (the reference trajectories). With
    out_dir, checkpoints go to out_dir and the predictor to out_dir/predictor.
    """
    config.validate()
    start = time.perf_counter()
    sigma_min, sigma_max = model_sigma_range(denoiser, config.sigma_min, config.sigma_max, default=EDM_RANGE)
    shape = tuple(shape or getattr(denoiser, "data_shape", None) or ())
    if not shape:
        raise ConfigError("pass shape= (the per-sample data shape); the denoiser does not declare data_shape")
    n_points = amed_points(config.nfe, config.afs)
    n_steps = n_points - 1
    if grid is not None:
        sigmas, config = _learned_grid(grid, denoiser, n_points, config)
        sigma_min, sigma_max = float(sigmas[-1]), float(sigmas[0])
        teacher_sigmas = refine_grid(sigmas, config.M + 1, config.rho)
    else:
        sigmas = get_sigmas(config.grid, n_points, sigma_min, sigma_max, config.rho)
        teacher_sigmas = get_sigmas(config.grid, (config.M + 1) * n_steps + 1, sigma_min, sigma_max, config.rho)
    model_device = _device_of(denoiser)
    device_name = config.device
    if device_name == "auto" and model_device is not None and model_device.type in ("cpu", "cuda"):
        device_name = model_device.type   # fit where the model lives
    config = config.resolved(n_steps, device_name)
    accelerator = make_accelerator(config)
    device = accelerator.device
    if model_device is not None and model_device.type != device.type:
        raise ConfigError(f"the denoiser is on {model_device} but the fit runs on {device} (config.device="
                          f"{config.device!r}); move the denoiser there first (denoiser.to({str(device)!r}))")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)   # the predictor's initial weights depend only on the seed
        predictor = AMEDPredictor(delta_c=config.delta_c, delta_a=config.delta_a, base_model=fingerprint(denoiser),
                                  nfe=config.nfe, grid=config.grid, rho=config.rho, sigma_min=sigma_min,
                                  sigma_max=sigma_max, afs=config.afs, base_solver=check_base(config.base_solver),
                                  teacher=config.teacher_solver, M=config.M,
                                  sigmas=None if grid is None else sigmas.tolist(),
                                  grid_model=None if grid is None else fingerprint(grid))

    teacher_seconds = [0.0]
    cache: dict[tuple[int, int], tuple[list[Tensor], dict]] = {}

    def batch(index: int, micro: int) -> tuple[list[Tensor], dict]:
        if (index, micro) not in cache:
            cache.clear()
            tic = time.perf_counter()
            generator = batch_generator(config.seed, index, accelerator.process_index, micro, device)
            z = torch.randn((config.batch_size, *shape), generator=generator, device=device,
                            dtype=DTYPES[config.dtype])
            cond = cond_sampler(generator, config.batch_size) if cond_sampler else {}
            states = teacher_trajectory(denoiser, sigma_max * z, teacher_sigmas, config.M + 1,
                                        config.teacher_solver, **cond)
            cache[(index, micro)] = (states, cond)
            teacher_seconds[0] += time.perf_counter() - tic
        return cache[(index, micro)]

    student_step = _student_step(denoiser, sigmas, config.base_solver, config.afs, n_steps)
    heldout_error, plain_error = _heldout_check(denoiser, config, sigmas, shape, cond_sampler, device)
    tracked = BestKept(predictor)
    if config.base_solver == "dpm2" and config.r_search:
        tracked.base_error.fill_(heldout_error(predictor))    # the base solver: measured before the warm start
        warm_start(predictor, denoiser, sigmas, *batch(0, 0), config.r_search, config.afs)

    def loss_fn(model: nn.Module, generator: torch.Generator, step: int, micro: int) -> Tensor:
        index, i = divmod(step, n_steps)                 # batch index, interval index
        if step % config.eval_every == 0 and micro == 0:
            tracked.check(heldout_error, step)
        states, cond = batch(index, micro)
        x_student = student_step(model, states, i, micro, cond)
        return (x_student - states[i + 1]).square().flatten(1).sum(1).mean()

    frozen = [(p, p.requires_grad) for p in denoiser.parameters()] if isinstance(denoiser, nn.Module) else []
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        result = fit(tracked, loss_fn, config, out_dir=out_dir, callback=callback, resume=resume, progress=progress,
                     description=f"fitting AMED {config.base_solver} (NFE {config.nfe})", accelerator=accelerator,
                     run={"shape": list(shape)})
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    trained = result.raw_model        # the held-out checks select among the trained (not averaged) states
    metrics = trained.finish(heldout_error, config.train_steps)
    fitted = trained.predictor.eval().requires_grad_(False)
    fitted.fitted_for["fit"] = config.to_dict()
    if plain_error is not None:
        metrics["heldout_error_plain"] = plain_error
    _warn_if_not_better(metrics, config)
    if out_dir is not None and result.is_main_process:
        fitted.save(Path(out_dir) / "predictor", overwrite=True)
    timings = {"total": time.perf_counter() - start, "teacher": teacher_seconds[0]}
    return dataclasses.replace(result, model=fitted, timings=timings, raw_model=fitted, metrics=metrics)


def refine_grid(sigmas: Tensor, substeps: int, rho: float = 7.0) -> Tensor:
    """Each interval of sigmas [N] split into `substeps` steps even in σ^{1/ρ}: [(N − 1)·substeps + 1] float64 whose
    every substeps-th level is sigmas' (on a Karras grid of the same ρ, the finer Karras grid)."""
    inv = torch.as_tensor(sigmas, dtype=torch.float64) ** (1 / rho)
    ramp = torch.arange(substeps, dtype=torch.float64) / substeps
    inner = (inv[:-1, None] + ramp * (inv[1:, None] - inv[:-1, None])).flatten() ** rho
    fine = torch.cat([inner, inv[-1:] ** rho])
    fine[::substeps] = torch.as_tensor(sigmas, dtype=torch.float64)     # the grid's own levels exactly
    return fine


def _learned_grid(grid: LearnedGrid, denoiser, n_points: int, config: AMEDConfig) -> tuple[Tensor, AMEDConfig]:
    """The grid's σ's (refused for another base model or another number of levels) and the config recording it."""
    grid.check(denoiser)
    sigmas = grid.sigmas.to(torch.float64)             # the levels themselves; AMED inserts its own points
    if len(sigmas) != n_points:
        raise ConfigError(f"AMED at NFE {config.nfe} (afs={config.afs}) runs on {n_points} levels, the learned grid "
                          f"has {len(sigmas)} (fitted for {grid.solver} at NFE {grid.nfe}); fit one with "
                          "difflab.amed.grid_for_amed, or ask for the NFE that grid gives")
    return sigmas, dataclasses.replace(config, grid="learned")


def grid_for_amed(denoiser, config: AMEDConfig, method: str = "ld3", grid_config: GridConfig = GridConfig(),
                  **cond: Any) -> FitResult[LearnedGrid]:
    """"Grid, then AMED": fit a grid (`fit_grid`, method gits / ld3 / ays) with the amed_points(nfe, afs) levels
    AMED needs, for the solver an unfitted predictor is (zero head: r = ½, c = a = 1), at config.nfe and AFS as
    config.afs: AMED-Solver is DPM-Solver-2 on the levels; AMED-Plugin is its base solver on the levels with their
    log-midpoints inserted (GridConfig.refine). Pass the result's model to `fit_amed(..., grid=...)`."""
    base = check_base(config.base_solver)
    grid_config = dataclasses.replace(grid_config, afs=config.afs, refine=base != "dpm2")
    grid_config.sigma_min = config.sigma_min if grid_config.sigma_min is None else grid_config.sigma_min
    grid_config.sigma_max = config.sigma_max if grid_config.sigma_max is None else grid_config.sigma_max
    return fit_grid(denoiser, base, config.nfe, method, grid_config, **cond)


class BestKept(nn.Module):
    """The predictor being fitted, with the best state seen at the held-out checks kept in buffers (so
    checkpoints carry it and a resumed fit returns what an uninterrupted one would)."""

    def __init__(self, predictor: AMEDPredictor):
        super().__init__()
        self.predictor = predictor
        self.register_buffer("best_state", nn.utils.parameters_to_vector(predictor.parameters()).detach().clone())
        self.register_buffer("best_error", torch.tensor(math.inf, dtype=torch.float64))
        self.register_buffer("best_step", torch.tensor(-1.0, dtype=torch.float64))   # float: the EMA averages buffers
        self.register_buffer("base_error", torch.tensor(math.nan, dtype=torch.float64))

    def config(self) -> dict:
        return self.predictor.config()

    def forward(self, *args, **kwargs):
        return self.predictor(*args, **kwargs)

    @torch.no_grad()
    def check(self, heldout_error: Callable[[nn.Module], float], step: int) -> None:
        """Measure the current state on the held-out noise; keep it if it is the best so far."""
        error = heldout_error(self.predictor)
        if step == 0 and math.isnan(float(self.base_error)):
            self.base_error.fill_(error)        # no warm start: the initial state is the base solver
        if error < float(self.best_error):
            self.best_error.fill_(error)
            self.best_step.fill_(step)
            self.best_state.copy_(nn.utils.parameters_to_vector(self.predictor.parameters()))

    @torch.no_grad()
    def finish(self, heldout_error: Callable[[nn.Module], float], step: int) -> dict[str, float]:
        """Check the final state, restore the best (the base solver's when nothing beat it): the metrics."""
        self.check(heldout_error, step)
        nn.utils.vector_to_parameters(self.best_state, self.predictor.parameters())
        if float(self.best_error) >= float(self.base_error):     # nothing beat the base: a zero head is the base
            nn.init.zeros_(self.predictor.head.weight)
            nn.init.zeros_(self.predictor.head.bias)
            self.best_error.copy_(self.base_error)
            self.best_step.fill_(0)
        return {"heldout_error_base": float(self.base_error), "heldout_error_fitted": float(self.best_error),
                "best_step": int(self.best_step)}


def heldout_generator(seed: int, device: torch.device) -> torch.Generator:
    """The RNG of the held-out noise: disjoint from every training batch's (`batch_generator`)."""
    digest = hashlib.blake2b(f"amed-heldout/{seed}".encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") >> 1)


def _warn_if_not_better(metrics: dict[str, float], config: AMEDConfig) -> None:
    """NotImprovedWarning when the fit kept its base solver, or when the plain base solver spending the same
    NFE on its own grid is closer to the reference than the fitted predictor."""
    where = f"AMED fit ({config.base_solver}, NFE {config.nfe})"
    base, fitted = metrics["heldout_error_base"], metrics["heldout_error_fitted"]
    if fitted >= base:
        warn(f"{where} did not improve on its base solver: held-out endpoint error vs the reference "
             f"{base:.4g} (base) and {fitted:.4g} (fitted); the returned predictor is the base solver. "
             "Try a finer teacher (M), more trajectories or another base solver", NotImprovedWarning)
    plain = metrics.get("heldout_error_plain")
    if plain is not None and fitted >= plain:
        warn(f"{where} is no better than plain {config.base_solver} spending the same {config.nfe} "
             f"evaluations on its own grid: held-out endpoint error {fitted:.4g} (fitted) vs {plain:.4g} "
             f"(plain); sample with the plain solver instead", NotImprovedWarning)


def _heldout_check(denoiser, config: AMEDConfig, sigmas: Tensor, shape: tuple[int, ...],
                   cond_sampler: CondSampler | None,
                   device: torch.device) -> tuple[Callable[[nn.Module], float], float | None]:
    """(heldout_error, plain_error): heldout_error(predictor) is the mean over config.heldout draws of
    ‖x_student − x_ref‖₂ at sigmas[-1], x_ref the teacher solver with max(heldout_substeps, M + 1) steps per
    interval of sigmas [N]; plain_error the same for the plain base solver spending config.nfe evaluations on the
    config's grid family (Karras for a learned grid), None for AMED-Solver (its base is DPM-Solver-2 on these very
    levels) or where the base solver cannot spend exactly config.nfe."""
    generator = heldout_generator(config.seed, device)
    z = torch.randn((config.heldout, *shape), generator=generator, device=device, dtype=DTYPES[config.dtype])
    cond = cond_sampler(generator, config.heldout) if cond_sampler else {}
    x_start = float(sigmas[0]) * z
    substeps = max(config.heldout_substeps, config.M + 1)
    reference_sigmas = refine_grid(sigmas, substeps, config.rho)
    target = teacher_trajectory(denoiser, x_start, reference_sigmas, substeps, config.teacher_solver, **cond)[-1]
    distance = functools.partial(mean_l2, reference=target)

    @torch.no_grad()
    def heldout_error(predictor: nn.Module) -> float:
        return distance(amed_plugin(denoiser, x_start, sigmas, predictor, base=config.base_solver, afs=config.afs,
                                    check=False, **cond))

    return heldout_error, _plain_error(denoiser, config, sigmas, x_start, distance, cond)


@torch.no_grad()
def _plain_error(denoiser, config: AMEDConfig, sigmas: Tensor, x_start: Tensor, distance: Callable[[Tensor], float],
                 cond: dict) -> float | None:
    """distance(the plain base solver's endpoint) at config.nfe on the grid family from sigmas[0] to sigmas[-1]."""
    if config.base_solver == "dpm2":
        return None
    family = "karras" if config.grid == "learned" else config.grid
    try:
        plain = sigmas_for_nfe(config.base_solver, config.nfe, family, float(sigmas[-1]), float(sigmas[0]),
                               config.rho, afs=config.afs)
    except ConfigError:
        return None
    return distance(sample(denoiser, x_start, plain.to(x_start.dtype), solver=config.base_solver, afs=config.afs,
                           **cond))


@torch.no_grad()
def warm_start(predictor: AMEDPredictor, denoiser, sigmas: Tensor, states: list[Tensor], cond: dict,
               candidates: int, afs: bool) -> Tensor:
    """Start a one-step student at the best constant r per interval instead of r = ½ (returns those r: [N−1]).

    The teacher-forced loss (11) of one interval, as a function of r, has more than one basin (on the
    2-D mixture at NFE 3–4 the last interval's has one near r = 0.9 and a far deeper one near r = 0.15),
    and gradient descent from r = ½ can settle in the wrong one. So each interval's loss is evaluated on
    one batch at `candidates` values of r in [0.02, 0.98] (c = a = 1), and the head's time columns and
    bias are set, by least squares, to give logit(r_i*) at interval i; its feature columns stay zero, so
    the warm start depends on the time alone and training goes on from there.
    """
    grid = torch.linspace(0.02, 0.98, candidates).tolist()
    best_r = []
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
        losses = [float((amed_step(denoiser, states[i], t_cur, t_next, ConstantPredictor(r),
                                   analytic_first=afs and i == 0, **cond)[0] - states[i + 1]).square().sum())
                  for r in grid]
        best_r.append(grid[min(range(len(grid)), key=losses.__getitem__)])
    target = torch.logit(torch.tensor(best_r, dtype=torch.float64))
    head = predictor.head
    times = torch.cat([predictor._time_embedding(sigmas[:-1].float()), predictor._time_embedding(sigmas[1:].float()),
                       torch.ones(len(best_r), 1)], dim=1).double()      # [N−1, 2·time_channels + 1]
    solution = torch.linalg.pinv(times) @ target                          # the minimum-norm exact fit
    n_feature = head.weight.shape[1] - 2 * predictor.time_channels
    head.weight[0, n_feature:] = solution[:-1].to(head.weight)
    head.bias[0] = solution[-1].to(head.bias)
    return torch.tensor(best_r)


def _student_step(denoiser, sigmas: Tensor, base_solver: str, afs: bool, n_steps: int):
    """student_step(model, teacher states, interval i, micro-batch, cond) -> the student's x at t_{i+1}.

    One-step students (dpm2 = AMED-Solver, euler) start from the teacher's state at t_i (teacher
    forcing); multistep ones continue from their own previous state, cut from the graph between intervals.
    """
    continuation = base_solver not in ONE_STEP_BASES
    students: dict[int, PluginState] = {}              # micro-batch -> the continuation student's state

    def student_step(model: nn.Module, states: list[Tensor], i: int, micro: int, cond: dict) -> Tensor:
        t_cur, t_next, first = float(sigmas[i]), float(sigmas[i + 1]), afs and i == 0
        if base_solver == "dpm2":                        # AMED-Solver, teacher forcing
            return amed_step(denoiser, states[i], t_cur, t_next, model, analytic_first=first, **cond)[0]
        if not continuation or i == 0 or micro not in students:
            # teacher forcing (or the first interval; or a resume that landed mid-batch, where the
            # student restarts from the teacher's state)
            students[micro] = PluginState(states[i], substep=2 * i)
        state, _ = plugin_interval(denoiser, model, PLUGIN_BASES[base_solver], students[micro], t_cur, t_next,
                                   2 * n_steps, analytic_first=first, **cond)
        students[micro] = state.detach()
        return state.x

    return student_step


def _device_of(denoiser) -> torch.device | None:
    if not isinstance(denoiser, nn.Module):
        return None
    tensor = next(iter(denoiser.parameters()), None)
    tensor = tensor if tensor is not None else next(iter(denoiser.buffers()), None)
    return None if tensor is None else tensor.device


__all__ = ["AMEDConfig", "BestKept", "NotImprovedWarning", "fit_amed", "teacher_trajectory", "batch_generator",
           "grid_for_amed", "heldout_generator", "refine_grid", "warm_start"]
