"""SuperDiff composition (Skreta et al., ICLR 2025; docs/methods/superdiff.md): the Itô density estimator and its
ODE form, OR / AND / averaging over several denoisers or one conditional denoiser's conditions."""
from difflab.compose.components import Components, Evaluation
from difflab.compose.ito import hutchinson, ito_increment, ode_increment, projected_noise_correction
from difflab.compose.superdiff import (
                        MODES,
                        CompositionResult,
                        Trajectory,
                        and_kappa,
                        and_kappa_system,
                        and_kappa_two,
                        average_kappa,
                        or_kappa,
                        superdiff,
)

__all__ = ["Components", "Evaluation", "ito_increment", "ode_increment", "hutchinson", "projected_noise_correction",
           "MODES", "CompositionResult", "Trajectory", "superdiff", "or_kappa", "and_kappa", "and_kappa_two",
           "and_kappa_system", "average_kappa"]
