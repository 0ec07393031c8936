"""The w-conditioned student: zero-initialised w slot (equal to the teacher at init), the x / v / both
parameterisations in σ-space against the VP formulas, save / load, and the diffusers plumbing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import difflab
from difflab import CFGDenoiser, EDMDenoiser
from difflab.core.errors import ConfigError, ModelFormatError, ShapeError
from difflab.distill import GuidedStudent, PredictionDenoiser, make_student
from difflab.distill.guided import dataset_batches, guided_loss
from difflab.nets import MLP, UNet


def tiny_unet(**kw):
    return UNet(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attn_resolutions=[], groups=4,
                num_classes=3, zero_init_output=False, **kw)


def _randomise(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return module


@pytest.fixture
def edm_teacher():
    torch.manual_seed(0)
    teacher = EDMDenoiser(tiny_unet(), sigma_data=0.5, data_shape=(1, 8, 8),
                          meta={"dataset": "digits", "num_classes": 3})
    return _randomise(teacher).eval()     # random weights everywhere (a fresh UNet's residual branches are 0)


def test_fresh_student_equals_the_conditional_teacher_at_w0_to_float_precision(edm_teacher):
    """The new w projection starts at zero: emb + 0 is emb bit for bit, so x̂_η(·, w) = x̂_c for every w
    (at w = 0 the guided teacher is the conditional model)."""
    student = make_student(edm_teacher).eval()
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.01, 0.1, 0.5, 2.0, 10.0, 80.0])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        guided = CFGDenoiser(edm_teacher)(x, sigma, w=0.0, class_labels=labels)
        conditional = edm_teacher(x, sigma, class_labels=labels)
        assert torch.equal(student(x, sigma, w=0.0, class_labels=labels), conditional)
        torch.testing.assert_close(student(x, sigma, w=0.0, class_labels=labels), guided, rtol=0, atol=1e-6)
        assert torch.equal(student(x, sigma, w=3.0, class_labels=labels), conditional)   # any w, until trained


def test_w_slot_is_live_after_the_projection_moves(edm_teacher):
    """The zero init is not a disconnected slot: once the projection is non-zero, w changes the output."""
    student = make_student(edm_teacher).eval()
    with torch.no_grad():
        student.denoiser.net.cond_embed.extra_embed.output.weight.normal_()
    x, sigma, labels = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 1.0]), torch.tensor([0, 1])
    with torch.no_grad():
        assert not torch.allclose(student(x, sigma, w=0.0, class_labels=labels),
                                  student(x, sigma, w=3.0, class_labels=labels))


def test_stage1_loss_of_the_fresh_student_is_zero_when_w_is_zero(edm_teacher):
    """guided_loss compares against the guided teacher in one batched call; at w ∈ [0, 0] it is the
    conditional model, which the fresh student equals: loss 0 exactly (a target built at the wrong w,
    or with the null label, would not be 0)."""
    student = make_student(edm_teacher)
    data = torch.randn(32, 1, 8, 8)
    labels = torch.randint(0, 3, (32,))
    loss_fn = guided_loss(CFGDenoiser(edm_teacher), dataset_batches(data, labels), 16, (0.0, 0.0))
    assert float(loss_fn(student, torch.Generator().manual_seed(0)).detach()) < 1e-10
    loss_fn = guided_loss(CFGDenoiser(edm_teacher), dataset_batches(data, labels), 16, (2.0, 2.0))
    assert float(loss_fn(student, torch.Generator().manual_seed(0)).detach()) > 1e-6


class _Fixed(torch.nn.Module):
    """A 'network' returning a given tensor (to check the parameterisation algebra)."""

    def __init__(self, out):
        super().__init__()
        self.out, self.config = out, {}

    def forward(self, x, c_noise, **cond):
        return self.out


@pytest.mark.parametrize("prediction", ["x", "v", "both"])
def test_parameterisations_recover_x0_from_their_exact_targets(prediction):
    """VP: z = αx0 + sε; v = αε − s·x0 (Salimans & Ho eq. 8 ff.); both = (x0, ε). Fed the exact target,
    each σ-space form must return x0 (float64, to round-off)."""
    gen = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 80.0], dtype=torch.float64)
    x = x0 + sigma[:, None] * noise
    alpha = (1 / np.sqrt(1 + sigma.numpy() ** 2))[:, None]
    s = sigma.numpy()[:, None] * alpha
    target = {"x": x0, "v": torch.as_tensor(alpha * noise.numpy() - s * x0.numpy()),
              "both": torch.cat([x0, noise], dim=1)}[prediction]
    denoiser = PredictionDenoiser(_Fixed(target), prediction)
    torch.testing.assert_close(denoiser(x, sigma), x0, rtol=1e-10, atol=1e-10)


def test_both_parameterisation_needs_twice_the_channels():
    denoiser = PredictionDenoiser(_Fixed(torch.zeros(2, 3)), "both")
    with pytest.raises(ShapeError, match="2×3"):
        denoiser(torch.zeros(2, 3), torch.ones(2))
    with pytest.raises(ConfigError, match="ε-prediction"):
        PredictionDenoiser(_Fixed(torch.zeros(1)), "epsilon")


@pytest.mark.parametrize("inner", ["edm", "prediction"])
def test_student_round_trips_through_disk_and_difflab_load(tmp_path, edm_teacher, inner):
    if inner == "edm":
        student = make_student(edm_teacher, base_model="abc", steps=4, w_max=3.0)
    else:
        net = MLP(dim=2, hidden=16, depth=1, num_classes=2, extra_embed=True, zero_init_output=False)
        student = GuidedStudent(PredictionDenoiser(net, "v", data_shape=(2,), meta={"num_classes": 2}))
    _randomise(student)
    student.save(tmp_path / "s")
    loaded = difflab.load(tmp_path / "s")
    shape = (1, 8, 8) if inner == "edm" else (2,)
    x, sigma, labels = torch.randn(3, *shape), torch.tensor([0.1, 1.0, 10.0]), torch.tensor([0, 1, 1])
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, w=2.0, class_labels=labels), student(x, sigma, w=2.0, class_labels=labels))
    assert isinstance(loaded, GuidedStudent) and loaded.config() == student.config()
    assert not any(p.requires_grad for p in loaded.parameters())


def test_student_folder_with_foreign_weights_is_refused(tmp_path, edm_teacher):
    from safetensors.torch import load_file, save_file
    make_student(edm_teacher).save(tmp_path / "s")
    tensors = load_file(tmp_path / "s" / "model.safetensors")
    tensors["stray"] = torch.zeros(1)
    save_file(tensors, tmp_path / "s" / "model.safetensors")
    with pytest.raises(ModelFormatError, match="GuidedStudent"):
        difflab.load(tmp_path / "s")


def test_make_student_refuses_a_model_without_a_network():
    with pytest.raises(ConfigError, match="cannot build"):
        make_student(difflab.GaussianMixture([[0.0]], [1.0]))


# ----- the same code on a diffusers UNet2DConditionModel (time_cond_proj_dim carries w) -----------
diffusers = pytest.importorskip("diffusers")


def tiny_condition_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def test_diffusers_student_plumbing_equal_at_init_and_trainable():
    """Offline, random, tiny: the student copies the UNet with a zero `time_embedding.cond_proj`, equals the
    teacher at init for every w, and one stage-1 step through `fit` moves the w projection."""
    from difflab.core.wrappers import VPDenoiser
    from difflab.distill import GuidedDistillConfig, distill_guided
    from difflab.interop.diffusers import make_diffusers_student
    from difflab.nets.diffusers_unet import DiffusersUNet
    from difflab.sampling.grids import ddpm_alphas_cumprod

    teacher = VPDenoiser(DiffusersUNet(tiny_condition_unet()), ddpm_alphas_cumprod(), "epsilon").eval()
    teacher.data_shape = (1, 8, 8)
    student = make_diffusers_student(teacher, time_cond_proj_dim=16)
    assert student.w_slot == "timestep_cond" and student.denoiser.model.unet.config.time_cond_proj_dim == 16
    text = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(2))
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 1.0, 5.0, 50.0])
    with torch.no_grad():
        expected = teacher(x, sigma, encoder_hidden_states=text)
        for w in (0.0, 2.5):
            assert torch.equal(student.eval()(x, sigma, w=w, encoder_hidden_states=text), expected)
    guided = CFGDenoiser(teacher, uncond=lambda cond: {**cond, "encoder_hidden_states": torch.zeros_like(
        cond["encoder_hidden_states"])})
    prompts = torch.randn(16, 3, 8)

    def batch_fn(generator, batch_size):
        idx = torch.randint(16, (batch_size,), generator=generator)
        return torch.randn(batch_size, 1, 8, 8, generator=generator), {"encoder_hidden_states": prompts[idx]}

    config = GuidedDistillConfig(train_steps=2, lr=1e-3, warmup_steps=1, checkpoint_every=10, device="cpu",
                                 batch_size=4)
    trained = distill_guided(guided, student.train(), batch_fn, config, progress=False).model
    assert float(trained.denoiser.model.unet.time_embedding.cond_proj.weight.abs().max()) > 0
    with pytest.raises(ConfigError, match="save_diffusers_student"):
        trained.save("unused")
