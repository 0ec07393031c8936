"""Guided distillation of a diffusers text-to-image teacher (tiny random Stable Diffusion pipeline, offline):
the student's guidance embedding is diffusers' own, its folder runs in a stock StableDiffusionPipeline exactly
as difflab's student sampler, `difflab distill guided --teacher SD_FOLDER --prompt ...` writes it, and the
stage-1 loss decreases on that teacher."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import difflab
from difflab.core.errors import ConfigError
from difflab.core.wrappers import CFGDenoiser
from difflab.distill import GuidedDistillConfig, GuidedStudent, distill_guided, guided_loss, make_student
from difflab.distill.samplers import sample_deterministic
from difflab.distill.student import guidance_embedding

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from difflab.interop.diffusers.loader import load_diffusers  # noqa: E402
from difflab.interop.diffusers.student import (  # noqa: E402  (needs diffusers)
    STUDENT_FILE,
    load_text_teacher,
    make_diffusers_student,
    pipeline_sigmas,
    prompt_batches,
    save_diffusers_student,
    student_unet,
    teacher_latents,
)

PROMPTS = ["a cat", "a dog"]
PROJ_DIM = 8


@pytest.fixture(scope="module")
def teacher_folder(tiny_pipeline):
    return tiny_pipeline("text_to_image")


@pytest.fixture(scope="module")
def teacher(teacher_folder):
    return load_text_teacher(teacher_folder)


@pytest.fixture(scope="module")
def student_folder(teacher_folder, teacher, tmp_path_factory):
    """A student whose guidance projection is random (as after training), so that w changes its output."""
    student = make_diffusers_student(teacher.denoiser, PROJ_DIM, base_model="abc", w_min=0.0, w_max=6.0)
    with torch.no_grad():
        weight = student_unet(student).time_embedding.cond_proj.weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    return save_diffusers_student(student, teacher_folder, tmp_path_factory.mktemp("student") / "student")


def pipeline(folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("dim", [8, 9, 256])
def test_guidance_embedding_is_diffusers_get_guidance_scale_embedding(dim):
    """The finding: w must reach `timestep_cond` as the stock pipeline computes it from guidance_scale − 1."""
    guidance_scale = torch.tensor([1.0, 1.5, 4.0, 8.5, 13.0])
    expected = diffusers.StableDiffusionPipeline.get_guidance_scale_embedding(None, guidance_scale - 1, dim)
    assert torch.equal(guidance_embedding(guidance_scale - 1, dim), expected)   # bit-identical: same float32 ops


def test_fresh_student_equals_the_conditional_teacher_at_every_w(teacher):
    student = make_diffusers_student(teacher.denoiser, PROJ_DIM).eval()
    assert student_unet(student).config.time_cond_proj_dim == PROJ_DIM
    text = teacher.encode_prompts(PROMPTS * 2)
    x, sigma = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0.05, 0.7, 3.0, 14.0])
    with torch.no_grad():
        expected = teacher.denoiser(x, sigma, encoder_hidden_states=text)
        for w in (0.0, 1.0, 7.5):     # the zero cond_proj adds exactly 0 to the time embedding
            assert torch.equal(student(x, sigma, w=w, encoder_hidden_states=text), expected)


@pytest.mark.parametrize("w, steps", [(0.0, 4), (2.5, 4), (6.0, 3)])
def test_stock_pipeline_runs_the_student_sampler(student_folder, teacher, w, steps):
    """StableDiffusionPipeline(guidance_scale = 1 + w, num_inference_steps = N) on the student folder gives the
    latents of difflab's deterministic sampler (N DDIM steps in σ-space) from the same noise: one UNet call
    per step with diffusers' guidance embedding, and the scheduler's step is `ddim_step` on the same grid."""
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = pipeline(student_folder)(prompt=PROMPTS, guidance_scale=1 + w, num_inference_steps=steps,
                                           latents=noise.clone(), output_type="latent").images
        student = difflab.load(student_folder)
        sigmas = pipeline_sigmas(student_folder, steps)
        text = teacher.encode_prompts(PROMPTS)
        ours = sample_deterministic(student, float(sigmas[0]) * noise, sigmas, w=w, encoder_hidden_states=text)
        other_w = sample_deterministic(student, float(sigmas[0]) * noise, sigmas, w=w + 1, encoder_hidden_states=text)
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0
    # float32 round-off of a few UNet calls on latents of size ~50 (seen: 8e-6); a w off by one moves them by ~1
    torch.testing.assert_close(latents, ours, rtol=1e-5, atol=1e-4)
    assert float((other_w - ours).abs().max()) > 0.1


def test_student_folder_is_a_diffusers_pipeline_and_a_difflab_student(student_folder, teacher_folder):
    student = difflab.load(student_folder)
    assert isinstance(student, GuidedStudent) and student.w_slot == "timestep_cond"
    assert student.w_embed_dim == PROJ_DIM and student.distilled["w_max"] == 6.0 and student.base_model == "abc"
    index = json.loads((student_folder / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert json.loads((student_folder / STUDENT_FILE).read_text())["class"] == "GuidedStudent"
    for part in ("vae", "text_encoder", "tokenizer"):    # the teacher's components, unchanged
        assert sorted(p.name for p in (student_folder / part).iterdir()) == \
            sorted(p.name for p in (teacher_folder / part).iterdir())
    half = difflab.load(student_folder, torch_dtype=torch.float64)
    assert difflab.fingerprint(half) == difflab.fingerprint(student)    # identity of the weights as stored


def test_the_diffusers_loader_itself_reads_a_student_folder_as_the_student(student_folder):
    """Dispatch by the folder's difflab_student.json inside the one diffusers format, not by registration order."""
    student = load_diffusers(student_folder)
    assert isinstance(student, GuidedStudent) and student.w_slot == "timestep_cond" and student.w_embed_dim == PROJ_DIM


def test_difflab_make_student_points_diffusers_teachers_to_interop(teacher):
    with pytest.raises(ConfigError, match="make_diffusers_student"):
        make_student(teacher.denoiser)


def test_guided_loss_decreases_on_the_tiny_teacher(teacher):
    embeddings = teacher.encode_prompts(PROMPTS)
    x0, ids = teacher_latents(teacher.denoiser, embeddings, per_prompt=8, steps=8)
    guided = CFGDenoiser(teacher.denoiser, uncond=teacher.null_condition)
    batches = prompt_batches(x0, ids, embeddings)
    torch.manual_seed(0)
    student = make_diffusers_student(teacher.denoiser, PROJ_DIM)
    sigma_range = (student.sigma_min, student.sigma_max)
    held_out = guided_loss(guided, batches, 32, (0.0, 4.0), *sigma_range)

    def loss(model):
        with torch.no_grad():
            return float(held_out(model, torch.Generator().manual_seed(123)))

    before = loss(student.eval())
    config = GuidedDistillConfig(train_steps=30, lr=1e-4, warmup_steps=1, ema_decay=0.0, checkpoint_every=10**6,
                                 device="cpu", batch_size=8, w_range=(0.0, 4.0))
    trained = distill_guided(guided, student.train(), batches, config, progress=False).model
    after = loss(trained)
    # seeded and deterministic (seen: 0.0110 -> 0.0071); the fresh student is the conditional teacher, so `before`
    # is the guidance gap itself
    assert before > 0 and after < 0.8 * before, (before, after)
    assert float(student_unet(trained).time_embedding.cond_proj.weight.abs().max()) > 0   # w is being learnt


def test_cli_distills_a_diffusers_teacher_into_a_pipeline_folder(teacher_folder, tmp_path):
    from difflab.apps.cli.distill import app

    out = tmp_path / "cli-student"
    args = ["guided", "--teacher", teacher_folder, "--prompt", "a cat", "--prompt", "a dog", "--w-range", 0, 3,
            "--train-steps", 2, "--batch-size", 2, "--out", out, "--device", "cpu"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["format"] == "diffusers" and summary["prompts"] == 2
    student = difflab.load(out)
    assert isinstance(student, GuidedStudent) and student.distilled["w_max"] == 3.0
    assert student.distilled["stage"] == "guided" and student.w_embed_dim == 256    # LCM's size by default
    with torch.no_grad():
        latents = pipeline(out)(prompt=["a cat"], guidance_scale=3.0, num_inference_steps=2,
                                output_type="latent").images
    assert latents.shape == (1, 4, 8, 8) and bool(torch.isfinite(latents).all())
    # a text-to-image teacher needs prompts, and --prompt needs a text-to-image teacher
    result = CliRunner().invoke(app, ["guided", "--teacher", str(teacher_folder), "--out", str(tmp_path / "x")])
    assert isinstance(result.exception, ConfigError) and "--prompt" in str(result.exception)
    result = CliRunner().invoke(app, ["guided", "--teacher", str(out), "--prompt", "a cat", "--out",
                                      str(tmp_path / "y")])
    assert isinstance(result.exception, ConfigError) and "already has a guidance embedding" in str(result.exception)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_force_replaces_its_own_diffusers_student_but_never_a_users_pipeline(teacher_folder, student_folder,
                                                                                 tmp_path, monkeypatch):
    from difflab.apps.cli.distill import app
    from difflab.interop.diffusers import student as student_module

    devices, real_load = [], student_module.load

    def recording_load(path, **options):
        devices.append(options.get("device"))
        return real_load(path, **options)

    monkeypatch.setattr(student_module, "load", recording_load)
    out, users = tmp_path / "student", tmp_path / "users-pipeline"
    shutil.copytree(student_folder, out)            # a student difflab wrote (w_max 6)
    shutil.copytree(teacher_folder, users)          # a pipeline difflab did not write
    args = ["guided", "--teacher", teacher_folder, "--prompt", "a cat", "--w-range", 0, 3, "--train-steps", 1,
            "--batch-size", 2, "--device", "cpu"]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--out", out]])
    assert isinstance(result.exception, ConfigError) and "--force" in str(result.exception)
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--out", out, "--force"]])
    assert result.exit_code == 0, result.output
    assert difflab.load(out).distilled["w_max"] == 3.0 and devices == ["cpu"]    # replaced; teacher on --device
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--out", users, "--force"]])
    assert isinstance(result.exception, ConfigError) and "not a difflab model folder" in str(result.exception)
    assert sorted(p.name for p in users.iterdir()) == sorted(p.name for p in teacher_folder.iterdir())
