"""Numerical guards: a NaN or an infinity in a model output stops every solver (and AMED-Solver with
the guard the CLI gives it) with NonFiniteError naming the solver, the step and its σ interval.

The expected step is not assumed per solver: the test records the step boundaries and the σ of each
model call, and the error must name the step in which the first bad output was returned."""
from __future__ import annotations

import math

import pytest
import torch

from difflab.amed.predictor import ConstantPredictor, amed_solver
from difflab.core.errors import NonFiniteError
from difflab.sampling import SOLVERS, get_sigmas, sample
from difflab.sampling.guards import finite_guard

GRID = get_sigmas("logsnr", 8, 0.1, 10.0)        # no final 0: every step's update uses the model output
BAD_FROM = float(GRID[4])                          # the model goes bad at σ <= σ_4


class BadBelow:
    """D = 0 (finite) above BAD_FROM, `bad` at and below it; logs model calls and finished steps."""

    def __init__(self, bad: float):
        self.bad, self.events = bad, []

    def __call__(self, x, sigma, **cond):
        level = float(sigma.reshape(-1)[0])
        self.events.append(("call", level))
        return torch.full_like(x, self.bad) if level <= BAD_FROM * (1 + 1e-12) else torch.zeros_like(x)

    def step_done(self, i, x, sigma_next):
        self.events.append(("step", i))

    def step_of_first_bad_call(self) -> int:
        steps_done = 0
        for kind, value in self.events:
            if kind == "step":
                steps_done += 1
            elif value <= BAD_FROM * (1 + 1e-12):
                return steps_done
        raise AssertionError("the model never went bad")


def assert_names_solver_step_and_sigma(err: NonFiniteError, solver: str, step: int) -> None:
    message = str(err)
    assert f"solver {solver!r}" in message and f"at step {step} " in message, message
    assert f"(sigma {float(GRID[step]):.4g} -> {float(GRID[step + 1]):.4g})" in message, message


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_a_non_finite_model_output_stops_every_solver_at_its_step(solver, bad):
    model = BadBelow(bad)
    x = 10.0 * torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(NonFiniteError) as caught:
        sample(model, x, GRID, solver=solver, generator=torch.Generator().manual_seed(1), callback=model.step_done)
    step = model.step_of_first_bad_call()
    assert step in (3, 4)                          # σ_4 is first evaluated in step 3 (as an end point) or 4
    assert_names_solver_step_and_sigma(caught.value, solver, step)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_model_output_stops_amed_with_the_cli_guard(bad):
    model = BadBelow(bad)
    x = 10.0 * torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(NonFiniteError) as caught:
        amed_solver(model, x, GRID, ConstantPredictor(), afs=False, check=False,
                    callback=finite_guard("amed", GRID, model.step_done))
    step = model.step_of_first_bad_call()
    assert step == 4                               # AMED evaluates at σ_i and inside (σ_{i+1}, σ_i) only
    assert_names_solver_step_and_sigma(caught.value, "amed", step)
