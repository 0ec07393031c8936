"""Distillation of classifier-free-guided models into few-step students (Meng et al., CVPR 2023).

- `student`: the w-conditioned student (`GuidedStudent`, `make_student`), x/v/both parameterisations
  in σ-space (`PredictionDenoiser`), save / load.
- `guided`: stage 1, one student for all guidance weights (`distill_guided`, `GuidedDistillConfig`).
- `progressive`: stage 2, halving the step count with the closed-form two-step target
  (`distill_progressive`, `ProgressiveDistillConfig`, `two_step_target`).
- `samplers`: deterministic and stochastic N-step samplers, image-to-image and inpainting,
  `sample_student` (the `difflab sample` entry point for a student folder).
- `schedule`: the cosine logSNR schedule in σ-space, truncated-SNR weighting.
"""
from difflab.distill.guided import GuidedDistillConfig, dataset_batches, distill_guided, guided_loss
from difflab.distill.progressive import (
    ProgressiveDistillConfig,
    distill_progressive,
    progressive_loss,
    progressive_target,
    two_step_target,
)
from difflab.distill.samplers import (
    ddim_step,
    img2img,
    inpaint,
    kernel_std,
    renoise,
    sample_deterministic,
    sample_stochastic,
    sample_student,
)
from difflab.distill.schedule import cosine_sigma, student_sigmas, truncated_snr_weight
from difflab.distill.student import GuidedStudent, PredictionDenoiser, load_student, make_student

__all__ = ["GuidedStudent", "PredictionDenoiser", "make_student", "load_student", "dataset_batches", "guided_loss",
           "GuidedDistillConfig", "distill_guided", "ProgressiveDistillConfig", "two_step_target",
           "progressive_target", "progressive_loss", "distill_progressive", "ddim_step", "kernel_std", "renoise",
           "sample_deterministic", "sample_stochastic", "img2img", "inpaint", "sample_student", "cosine_sigma",
           "student_sigmas", "truncated_snr_weight"]
