"""Time grids, solvers and the `sample` entry point."""
from difflab.sampling.grids import GRIDS, check_grid, discrete_sigmas, get_sigmas, points_for_nfe
from difflab.sampling.noise import PerSampleGenerator, randn_like, seeded_noise
from difflab.sampling.registry import SOLVERS
from difflab.sampling.sample import sample, sigmas_for_nfe
from difflab.sampling.solvers import dpm2, dpmpp_2m, dpmpp_3m, dpmpp_3m_taylor, euler, euler_maruyama, heun
from difflab.sampling.steps import Solver, first_eps

__all__ = ["GRIDS", "get_sigmas", "discrete_sigmas", "points_for_nfe", "check_grid", "sigmas_for_nfe",
           "PerSampleGenerator", "randn_like", "seeded_noise", "sample", "SOLVERS", "Solver", "first_eps",
           "euler", "heun", "dpm2", "dpmpp_2m", "dpmpp_3m", "dpmpp_3m_taylor", "euler_maruyama"]
