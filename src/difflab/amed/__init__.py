"""AMED (Zhou et al., CVPR 2024): learned intermediate times for sampling in about five steps.

All of AMED is here: the predictor g_φ and AMED-Solver (`predictor`), AMED-Plugin on any base
solver (`plugin`) and fitting on the shared training loop (`fit`, also on a learned grid); learned time
grids, GITS, LD3 and Align Your Steps (`grids`, `ays`; docs/methods/grids.md). docs/methods/amed.md has the
equations.
"""
from difflab.amed.fit import AMEDConfig, fit_amed, grid_for_amed, teacher_trajectory
from difflab.amed.grids import GridConfig, LearnedGrid, fit_grid, load_grid
from difflab.amed.plugin import BASE_SOLVERS, PLUGIN_BASES, amed_plugin, amed_sample, check_base
from difflab.amed.predictor import (
                                    AMEDParams,
                                    AMEDPredictor,
                                    ConstantPredictor,
                                    amed_nfe,
                                    amed_points,
                                    amed_solver,
                                    amed_step,
                                    check_predictor,
                                    load_predictor,
                                    predictor_sigmas,
)

__all__ = ["AMEDConfig", "AMEDParams", "AMEDPredictor", "BASE_SOLVERS", "ConstantPredictor", "GridConfig",
           "LearnedGrid", "PLUGIN_BASES",
           "amed_nfe", "amed_plugin", "amed_points", "amed_sample", "amed_solver", "amed_step", "check_base",
           "check_predictor", "fit_amed", "fit_grid", "grid_for_amed", "load_grid", "load_predictor",
           "predictor_sigmas",
           "teacher_trajectory"]
