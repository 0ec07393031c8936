"""Guided distillation of a diffusers text-to-image teacher, into a student that a stock pipeline runs.

The teacher is a Stable Diffusion layout (`unet/ scheduler/ text_encoder/ tokenizer/ vae/`) loaded by
`difflab.load` (`load_text_teacher` checks it is one): a `TextToImageDenoiser`, whose inner `denoiser` is the
UNet's σ-space `VPDenoiser` conditioned on `encoder_hidden_states`, `encode_prompts` gives those, and
`null_condition` the empty prompt's (the unconditional half of classifier-free guidance).

The student is the same UNet with `time_cond_proj_dim` set (256, as LCM students, by default), every
teacher weight copied and the new `time_embedding.cond_proj` at zero, so it equals the conditional
teacher at every w until trained; w reaches it as `timestep_cond = guidance_embedding(w)`, exactly
diffusers' `get_guidance_scale_embedding(guidance_scale − 1)` (difflab's w is diffusers' scale − 1).
The algorithm is `difflab.distill.distill_guided`, unchanged: it receives the student as a denoiser.

On disk the student is a diffusers pipeline folder: the teacher's components, the student UNet in
`unet/`, an `EulerDiscreteScheduler` with trailing timesteps in `scheduler/` (its step is
x̂ + σ_next·ε̂, difflab's `ddim_step`, on the table's σ's at N trailing timesteps, then 0), and
`difflab_student.json` (what it was distilled from and for). A stock `StableDiffusionPipeline` with
`guidance_scale = 1 + w` and `num_inference_steps = N` then runs difflab's deterministic student
sampler on `pipeline_sigmas(folder, N)`, one UNet call per step; `difflab.load` gives the `GuidedStudent`.

    teacher = load_text_teacher(folder, device="cuda")
    student = make_diffusers_student(teacher.denoiser)
    embeddings = teacher.encode_prompts(["a cat", "a dog"])
    x0, ids = teacher_latents(teacher.denoiser, embeddings, per_prompt=64)
    result = distill_guided(CFGDenoiser(teacher.denoiser, uncond=teacher.null_condition), student,
                            prompt_batches(x0, ids, embeddings), config)
    save_diffusers_student(result.model, folder, "student")
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from difflab.core.errors import ConfigError, ModelFormatError
from difflab.core.fingerprint import PINNED, fingerprint
from difflab.core.io import atomic_folder, write_json
from difflab.core.wrappers import VPDenoiser
from difflab.distill.samplers import sample_deterministic
from difflab.distill.student import GuidedStudent
from difflab.interop.diffusers.loader import STUDENT_FILE, load_unet_denoiser, register_student_loader
from difflab.interop.diffusers.text_to_image import TextToImageDenoiser
from difflab.models import load
from difflab.nets.diffusers_unet import DiffusersUNet

TIME_COND_PROJ_DIM = 256          # LCM's
TEACHER_SAMPLE_STEPS = 25         # steps of the teacher's own samples, the data of a data-free run


# ----- the teacher --------------------------------------------------------------------------------
def load_text_teacher(folder: str | Path, device: str | torch.device | None = None,
                      torch_dtype: torch.dtype | None = None) -> TextToImageDenoiser:
    """`difflab.load(folder, device=, torch_dtype=)`, checked to be a guided teacher: a text-to-image pipeline
    on a DDPM table whose UNet has no guidance embedding yet."""
    teacher = load(folder, device=device, torch_dtype=torch_dtype)
    if isinstance(teacher, GuidedStudent):
        raise ConfigError(f"{folder} is a distilled student (its UNet already has a guidance embedding), not a guided "
                          "teacher; distil from the model it came from")
    if not isinstance(teacher, TextToImageDenoiser) or not isinstance(teacher.denoiser, VPDenoiser):
        inner = type(getattr(teacher, "denoiser", teacher)).__name__
        raise ConfigError(f"{folder} holds a {type(teacher).__name__} ({inner}); guided distillation from diffusers "
                          "needs a text-to-image pipeline (unet/ vae/ text_encoder/ tokenizer/ scheduler/) on a "
                          "DDPM table (ε, v or sample prediction)")
    _check_no_guidance_embedding(teacher.denoiser.model.unet, str(folder))
    return teacher


def _check_no_guidance_embedding(unet: nn.Module, where: str) -> None:
    dim = unet.config.get("time_cond_proj_dim")
    if dim is not None:
        raise ConfigError(f"{where}'s UNet already has a guidance embedding (time_cond_proj_dim={dim}): it is a "
                          "distilled student, not a guided teacher; distil from the model without one")


# ----- the student --------------------------------------------------------------------------------
def make_diffusers_student(model: VPDenoiser, time_cond_proj_dim: int = TIME_COND_PROJ_DIM,
                           **distilled: Any) -> GuidedStudent:
    """A w-conditioned student from `model`, a VPDenoiser around a diffusers UNet2DConditionModel (the teacher).

    The UNet is rebuilt with `time_cond_proj_dim`, every teacher weight copied, and its new
    `time_embedding.cond_proj` (a bias-free Linear) set to zero, so the student equals the teacher at
    every w until trained. `distilled`: GuidedStudent's keywords (base_model, w_min, ...).
    """
    unet = getattr(getattr(model, "model", None), "unet", None)
    if not isinstance(model, VPDenoiser) or unet is None or not hasattr(unet.config, "time_cond_proj_dim"):
        raise ConfigError(f"make_diffusers_student needs a VPDenoiser around a diffusers UNet2DConditionModel, "
                          f"got a {type(model).__name__}")
    _check_no_guidance_embedding(unet, "the teacher")
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}   # _use_default_values would reset it
    new_unet = type(unet).from_config({**config, "time_cond_proj_dim": int(time_cond_proj_dim)})
    missing, unexpected = new_unet.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise ConfigError(f"cannot copy the teacher's UNet into a student (missing {missing}, unexpected {unexpected})")
    nn.init.zeros_(new_unet.time_embedding.cond_proj.weight)   # the student starts as the teacher
    new_unet.to(next(unet.parameters()).device)
    alphas_cumprod = 1 / (1 + (2 * model.log_sigmas).exp())        # ᾱ_t = 1/(1 + σ_t²)
    denoiser = VPDenoiser(DiffusersUNet(new_unet), alphas_cumprod.cpu(), model.prediction_type)
    denoiser.log_sigmas = model.log_sigmas.clone()                  # bit-identical σ ↔ t map
    denoiser.data_shape = model.data_shape
    return GuidedStudent(denoiser.train().requires_grad_(True), "timestep_cond", int(time_cond_proj_dim), **distilled)


def student_unet(student: GuidedStudent) -> nn.Module:
    """The diffusers UNet2DConditionModel inside a student from `make_diffusers_student`."""
    unet = getattr(getattr(student.denoiser, "model", None), "unet", None)
    if student.w_slot != "timestep_cond" or unet is None:
        raise ConfigError("this student does not wrap a diffusers UNet; save it with student.save(path)")
    return unet


# ----- the pipeline's sampler ----------------------------------------------------------------------
def student_scheduler(config: dict):
    """The scheduler a student folder carries, from the teacher's scheduler config (its ᾱ table and
    prediction type): EulerDiscreteScheduler, trailing timesteps (the first at the table's top), ending
    at σ = 0. Its step x + (σ_next − σ)·ε̂ = x̂ + σ_next·ε̂ is difflab's `ddim_step`."""
    from diffusers import EulerDiscreteScheduler

    table = {k: v for k, v in config.items() if not k.startswith("_")}
    return EulerDiscreteScheduler.from_config({
        **table, "timestep_spacing": "trailing", "final_sigmas_type": "zero", "interpolation_type": "linear",
        "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
        "timestep_type": "discrete", "steps_offset": 1})   # (unused by trailing spacing; the pipeline wants 1)


def pipeline_sigmas(folder: str | Path, steps: int) -> Tensor:
    """The σ grid [steps + 1] (float64, ending at 0) that a stock pipeline on the student `folder` steps on
    with num_inference_steps=steps: run `distill.sample_deterministic` on it to get the pipeline's latents."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler.from_pretrained(Path(folder) / "scheduler")
    scheduler.set_timesteps(int(steps))
    return scheduler.sigmas.double()


# ----- on disk -------------------------------------------------------------------------------------
def save_diffusers_student(student: GuidedStudent, teacher_folder: str | Path, path: str | Path,
                           overwrite: bool = False) -> Path:
    """Write the student as a diffusers pipeline folder, atomically: the teacher folder's components, the
    student UNet in unet/, `student_scheduler` in scheduler/, and STUDENT_FILE. Returns the path."""
    teacher_folder, unet = Path(teacher_folder), student_unet(student)
    if not (teacher_folder / "model_index.json").is_file():
        raise ModelFormatError(f"{teacher_folder} has no model_index.json; the student is saved beside the "
                               "teacher pipeline's components")
    scheduler = student_scheduler(json.loads((teacher_folder / "scheduler" / "scheduler_config.json").read_text()))
    with atomic_folder(path, overwrite=overwrite) as tmp:
        for entry in teacher_folder.iterdir():
            if entry.name in ("unet", "scheduler", STUDENT_FILE) or entry.name.startswith("."):
                continue
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        index = json.loads((tmp / "model_index.json").read_text())
        write_json(tmp / "model_index.json", {**index, "scheduler": ["diffusers", type(scheduler).__name__]})
        write_json(tmp / STUDENT_FILE, {"class": "GuidedStudent", "w_slot": student.w_slot,
                                        "w_embed_dim": student.w_embed_dim, **student.distilled}, sort_keys=True)
    return Path(path)


def load_diffusers_student(path: str | Path, device: str | torch.device | None = None,
                           torch_dtype: torch.dtype | None = None, variant: str | None = None) -> GuidedStudent:
    """A student folder (from `save_diffusers_student`) as its GuidedStudent (eval, frozen) on `device`, its
    UNet in `torch_dtype` (default float32) from the weights `variant`; `difflab.load` dispatches here.
    Call it with `w=` and `encoder_hidden_states=`; its fingerprint is that of the weights as stored."""
    path = Path(path)
    try:
        meta = json.loads((path / STUDENT_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ModelFormatError(f"{path / STUDENT_FILE} is not readable JSON ({err})") from err
    denoiser = load_unet_denoiser(path, variant=variant)   # float32, cast below after pinning the identity
    unet = denoiser.model.unet
    if unet.config.get("time_cond_proj_dim") != meta.get("w_embed_dim"):
        raise ModelFormatError(f"{path}: the UNet's time_cond_proj_dim ({unet.config.get('time_cond_proj_dim')}) "
                               f"is not the student's w_embed_dim ({meta.get('w_embed_dim')})")
    keys = ("base_model", "teacher", "stage", "steps", "w_min", "w_max", "grid_sigma_max", "dataset", "fit")
    student = GuidedStudent(denoiser, "timestep_cond", meta["w_embed_dim"], **{k: meta[k] for k in keys if k in meta})
    if torch_dtype is not None:
        setattr(student, PINNED, fingerprint(student))   # of the weights as stored, before rounding them
        student.to(torch_dtype)
    return student.to(device).eval().requires_grad_(False)


# ----- data: the teacher's own samples, one pool per prompt ---------------------------------------------
def teacher_latents(teacher: VPDenoiser, embeddings: Tensor, per_prompt: int, steps: int = TEACHER_SAMPLE_STEPS,
                    seed: int = 0) -> tuple[Tensor, Tensor]:
    """x0 [P·per_prompt, *data_shape] sampled from the conditional teacher (w = 0) for each of the P prompt
    embeddings [P, tokens, dim], with `steps` DDIM steps on trailing timesteps; and their prompt ids [P·n]."""
    ids = torch.arange(len(embeddings)).repeat_interleave(per_prompt)
    device = embeddings.device
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(ids), *teacher.data_shape, generator=generator).to(device)
    sigmas = _trailing_sigmas(teacher, steps)
    with torch.no_grad():
        x0 = sample_deterministic(teacher, float(sigmas[0]) * noise, sigmas, encoder_hidden_states=embeddings[ids])
    return x0, ids


def _trailing_sigmas(denoiser: VPDenoiser, steps: int) -> Tensor:
    """σ at `steps` trailing timesteps of the denoiser's table, then 0: [steps + 1] float64."""
    table = denoiser.log_sigmas.exp().cpu()
    timesteps = (torch.arange(len(table), 0, -len(table) / steps, dtype=torch.float64).round() - 1).long()
    return torch.cat([table[timesteps], torch.zeros(1, dtype=torch.float64)])


def prompt_batches(x0: Tensor, prompt_ids: Tensor, embeddings: Tensor) -> Callable:
    """batch_fn(generator, B) -> (x0 [B, ...], {"encoder_hidden_states": [B, tokens, dim]}) for distill_guided,
    drawn uniformly from the pool (x0 [N, ...], prompt_ids [N] into embeddings [P, tokens, dim])."""

    def batch_fn(generator: torch.Generator, batch_size: int) -> tuple[Tensor, dict[str, Any]]:
        idx = torch.randint(len(x0), (batch_size,), generator=generator, device=generator.device).to(x0.device)
        return x0[idx], {"encoder_hidden_states": embeddings[prompt_ids.to(x0.device)[idx]]}

    return batch_fn

__all__ = ["load_text_teacher", "make_diffusers_student", "student_unet", "student_scheduler", "pipeline_sigmas",
           "save_diffusers_student", "load_diffusers_student", "teacher_latents", "prompt_batches", "STUDENT_FILE",
           "TIME_COND_PROJ_DIM"]


register_student_loader(load_diffusers_student)
