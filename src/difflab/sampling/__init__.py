"""Time grids, solvers and the `sample` entry point."""
from .grids import GRIDS, check_grid, get_sigmas, points_for_nfe
from .noise import PerSampleGenerator, randn_like, seeded_noise
from .sample import sample
from .solvers import SOLVERS, Solver, euler, heun

__all__ = ["GRIDS", "get_sigmas", "points_for_nfe", "check_grid", "PerSampleGenerator", "randn_like", "seeded_noise",
           "sample", "SOLVERS", "Solver", "euler", "heun"]
