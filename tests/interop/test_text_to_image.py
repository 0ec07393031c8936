"""A user's Stable Diffusion folder (issue 16, finding 1): a tiny random `StableDiffusionPipeline` saved with
`save_pretrained` loads as a latent text-to-image denoiser that takes prompts, decodes to images, and runs
every solver, classifier-free guidance and AMED in latent space, offline."""
from __future__ import annotations

import warnings

import pytest
import torch

import difflab
from difflab.amed import AMEDConfig, amed_sample, fit_amed, predictor_sigmas
from difflab.core.errors import ShapeError
from difflab.sampling.registry import SOLVERS

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from difflab.interop.diffusers.text_to_image import TextToImageDenoiser  # noqa: E402

# a float32 network evaluated on the same inputs in another batch composition: float32 round-off
ROUND_OFF = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def sd_folder(tiny_pipeline):
    return tiny_pipeline("text_to_image")


@pytest.fixture(scope="module")
def sd(sd_folder):
    return difflab.load(sd_folder)


def noisy_latents(model, n: int = 2, sigma: float = 3.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = sigma * torch.randn(n, *model.data_shape, generator=torch.Generator().manual_seed(seed))
    return x, torch.full((n,), sigma)


def test_stable_diffusion_folder_loads_as_a_text_to_image_denoiser(sd):
    """Finding 1: this loaded as a bare VPDenoiser, the VAE and text encoder ignored (no prompt, no decode)."""
    assert isinstance(sd, TextToImageDenoiser)
    assert sd.data_shape == (4, 8, 8) and sd.image_shape == (3, 16, 16)
    assert 0 < sd.sigma_min < 0.05 and 14 < sd.sigma_max < 15          # Stable Diffusion's own table
    assert not any(p.requires_grad for p in sd.parameters()) and not sd.training


@torch.no_grad()
def test_prompt_conditions_the_output_and_equals_its_embeddings(sd):
    """Finding 1: there was no way to pass a prompt."""
    x, sigma = noisy_latents(sd)
    cat, dog = sd(x, sigma, prompt="a cat"), sd(x, sigma, prompt="a dog")
    assert (cat - dog).abs().max() > 1e-3                                # the prompt reaches the UNet
    embeddings = sd.encode_prompts(["a cat", "a dog"])
    assert embeddings.shape == (2, 16, 8)                                # [N, tokens, dim]
    torch.testing.assert_close(sd(x, sigma, encoder_hidden_states=embeddings[[0, 0]]), cat, rtol=0, atol=0)
    mixed = sd(x, sigma, prompt=["a cat", "a dog"])                      # one prompt per sample
    torch.testing.assert_close(mixed, torch.stack([cat[0], dog[1]]), **ROUND_OFF)


@torch.no_grad()
def test_prompt_cache_encodes_each_string_once(sd_folder):
    model = difflab.load(sd_folder)
    rows = []
    model.text_encoder.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    x, sigma = noisy_latents(model, n=3)
    model(x, sigma, prompt="a red car")
    model(x, sigma, prompt=["a red car", "a blue car", "a red car"])
    model(x, sigma, prompt="a blue car")
    model.encode_prompts(["a red car", "a blue car"])
    assert rows == [1, 1]                                                # each string encoded once, then cached


def test_a_prompt_list_of_the_wrong_length_is_refused(sd):
    x, sigma = noisy_latents(sd, n=3)
    with pytest.raises(ShapeError, match="2 prompts for a batch of 3"):
        sd(x, sigma, prompt=["a", "b"])


@torch.no_grad()
def test_decode_gives_images_in_unit_range_and_encode_gives_latents(sd):
    latents, _ = noisy_latents(sd, n=2, sigma=1.0)
    images = sd.decode(latents)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert sd.encode(images).shape == (2, 4, 8, 8)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@torch.no_grad()
def test_every_solver_samples_finite_latents_with_a_prompt(sd, solver):
    sigmas = difflab.get_sigmas("karras", 4, sd.sigma_min, sd.sigma_max)
    x = difflab.seeded_noise(range(2), sd.data_shape, float(sigmas[0]))
    out = difflab.sample(sd, x, sigmas, solver=solver, generator=torch.Generator().manual_seed(0), prompt="a cat")
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


@torch.no_grad()
def test_cfg_with_prompts_is_the_guidance_formula(sd):
    x, sigma = noisy_latents(sd)
    guided = difflab.CFGDenoiser(sd, w=3.0, uncond=sd.null_condition)
    d_c, d_u = sd(x, sigma, prompt="a cat"), sd(x, sigma, prompt="blurry")
    by_hand = d_u + (1 + 3.0) * (d_c - d_u)                              # conventions.md (12)
    torch.testing.assert_close(guided(x, sigma, prompt="a cat", negative_prompt="blurry"), by_hand, **ROUND_OFF)
    d_empty = sd(x, sigma, prompt="")                                    # no negative prompt: the empty one
    torch.testing.assert_close(guided(x, sigma, prompt=["a cat", "a cat"]), d_empty + 4 * (d_c - d_empty),
                               **ROUND_OFF)
    embeddings = sd.encode_prompts(["a cat"]).expand(2, -1, -1)
    torch.testing.assert_close(guided(x, sigma, encoder_hidden_states=embeddings), d_empty + 4 * (d_c - d_empty),
                               **ROUND_OFF)


def test_amed_plugin_fits_and_samples_in_latent_space_with_a_prompt(sd):
    config = AMEDConfig(nfe=3, base_solver="ipndm", trajectories=4, batch_size=2, heldout=2, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                                  # a 2-batch fit need not beat its base
        predictor = fit_amed(sd, config, cond_sampler=lambda generator, batch: {"prompt": "a cat"}).model
    assert predictor.fitted_for["base_model"] == difflab.fingerprint(sd)
    sigmas = predictor_sigmas(predictor)
    x = difflab.seeded_noise(range(2), sd.data_shape, float(sigmas[0]))
    with torch.no_grad():
        out = amed_sample(sd, x, sigmas, predictor, prompt="a cat")
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


@torch.no_grad()
def test_bfloat16_pipeline_samples_from_float32_latents(sd_folder, sd):
    """Finding 2 (load side): difflab.load had no torch_dtype."""
    model = difflab.load(sd_folder, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    sigmas = difflab.get_sigmas("karras", 4, model.sigma_min, model.sigma_max)
    x = difflab.seeded_noise(range(2), model.data_shape, float(sigmas[0]))
    out = difflab.sample(model, x, sigmas, solver="dpmpp_2m", prompt="a cat")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    reference = difflab.sample(sd, x, sigmas, solver="dpmpp_2m", prompt="a cat")
    # bf16 weights keep 8 significant bits: the latents agree to a few percent of their scale, not more
    assert (out - reference).abs().max() < 0.1 * reference.abs().max()
    assert model.decode(out).dtype == torch.float32
