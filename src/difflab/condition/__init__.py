"""Inverse problems: measurement operators, DEFT (a small learned h-transform on a frozen model),
and the DPS / ΠGDM baselines, all as σ-space denoisers that every solver runs (docs/methods/deft.md)."""
from difflab.condition.deft import DEFTConfig, DEFTDenoiser, HNetwork, deft_x0, fit_deft, load_hnet, parameter_fraction
from difflab.condition.guidance import DPS, GuidedDenoiser, PiGDM
from difflab.condition.operators import (
                                         HDR,
                                         OPERATORS,
                                         Blur,
                                         Inpaint,
                                         Operator,
                                         PhaseRetrieval,
                                         Radon,
                                         SuperResolution,
                                         operator_from_config,
)

__all__ = ["Operator", "Inpaint", "SuperResolution", "Blur", "HDR", "PhaseRetrieval", "Radon", "OPERATORS",
           "operator_from_config", "HNetwork", "DEFTConfig", "DEFTDenoiser", "deft_x0", "fit_deft", "load_hnet",
           "parameter_fraction", "DPS", "PiGDM", "GuidedDenoiser"]
