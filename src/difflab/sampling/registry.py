"""Every training-free solver by name: the one-step and DPM-Solver++ family (`solvers`) and the
linear multistep family (`multistep`)."""
from difflab.sampling.multistep import MULTISTEP_SOLVERS
from difflab.sampling.solvers import SINGLESTEP_SOLVERS
from difflab.sampling.steps import Solver

SOLVERS: dict[str, Solver] = {**SINGLESTEP_SOLVERS, **MULTISTEP_SOLVERS}
