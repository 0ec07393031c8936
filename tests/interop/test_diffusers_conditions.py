"""Plumbing: a tiny random-weight diffusers UNet2DConditionModel composed over two conditioning
embeddings (the Stable-Diffusion use of SuperDiff: one text model, two prompts) through the same code
path, offline. Shapes, one batched call per step, finite outputs, AND's equal estimates."""
from __future__ import annotations

import pytest
import torch

from difflab import get_sigmas
from difflab.compose import Components, superdiff
from difflab.core.wrappers import VPDenoiser
from difflab.nets.diffusers_unet import DiffusersUNet
from difflab.sampling import PerSampleGenerator, seeded_noise

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval().requires_grad_(False)
    denoiser = VPDenoiser(DiffusersUNet(unet), diffusers.DDPMScheduler().alphas_cumprod)
    denoiser.data_shape = (1, 8, 8)
    return denoiser, unet


@pytest.mark.parametrize("sde", [True, False], ids=["sde", "ode"])
def test_unet2dcondition_composed_over_two_prompts_in_one_batched_call(text_model, sde):
    denoiser, unet = text_model
    rows = []
    handle = unet.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    prompts = torch.randn(2, 1, 4, 8, generator=torch.Generator().manual_seed(1))   # [prompt, 1, tokens, dim]
    components = Components.over_conditions(
        denoiser, [{"encoder_hidden_states": prompts[0]}, {"encoder_hidden_states": prompts[1]}], w=1.5,
        uncond={"encoder_hidden_states": torch.zeros(1, 4, 8)})
    sigmas = get_sigmas("karras", 4, denoiser.sigma_min, 10.0)
    n = 3
    x = seeded_noise(range(n), (1, 8, 8), float(sigmas[0]))
    try:
        with torch.no_grad():
            result = superdiff(components, x, sigmas, mode="and", sde=sde, generator=PerSampleGenerator(range(n)))
    finally:
        handle.remove()
    assert result.x.shape == (n, 1, 8, 8) and torch.isfinite(result.x).all()
    assert result.log_q.shape == (n, 2) and torch.isfinite(result.log_q).all()
    assert rows == [3 * n] * 3                     # prompt 1, prompt 2 and the null prompt in one call per step
    # AND keeps the two estimates equal (float32 network: to float32 round-off of the inner products)
    torch.testing.assert_close(result.log_q[:, 0], result.log_q[:, 1], rtol=1e-4, atol=1e-3)
