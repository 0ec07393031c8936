"""Tiny random-weight diffusers pipelines, built and saved offline (no download).

They have the exact folder layouts users bring (a Stable Diffusion pipeline: `unet/ vae/ text_encoder/
tokenizer/ scheduler/`; a pixel DDPM pipeline: `unet/ scheduler/`; a flow-matching pixel model with a
`FlowMatchEulerDiscreteScheduler`) at a few thousand parameters, so that the tests, the README and the
benchmarks run every capability on "a user's diffusers model" in seconds on a CPU. The CLIP tokenizer gets
a byte-level vocabulary and no merges (each character a token): real tokenizers need their vocabulary
files, which would have to be downloaded.

    folder = save_tiny_pipeline(tmp_path / "sd", kind="text_to_image")
    model = difflab.load(folder)
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

KINDS = ("text_to_image", "pixel", "flow")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
# Stable Diffusion 1.x's table (scaled-linear betas), as its scheduler_config.json has it
SD_TABLE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
TOKENS = 16             # tokenizer's model_max_length (77 in CLIP)
TEXT_DIM = 8            # CLIP hidden size = the UNet's cross_attention_dim


def save_tiny_pipeline(folder: str | Path, kind: str = "text_to_image", seed: int = 0,
                       prediction_type: str = "epsilon", sample_size: int = 8) -> Path:
    """Build a tiny random pipeline of `kind` (one of KINDS) with `seed` and save it to `folder`
    (safetensors weights). Returns the folder. text_to_image: latents [4, sample_size, sample_size],
    images [3, 2·sample_size, 2·sample_size]; pixel and flow: images [3, sample_size, sample_size]."""
    import diffusers

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    folder = Path(folder)
    torch.manual_seed(seed)
    if kind == "text_to_image":
        pipe = diffusers.StableDiffusionPipeline(
            unet=_text_unet(sample_size), vae=_vae(), text_encoder=_text_encoder(), tokenizer=_tokenizer(),
            scheduler=diffusers.PNDMScheduler(**SD_TABLE, skip_prk_steps=True, steps_offset=1,
                                              prediction_type=prediction_type),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif kind == "pixel":
        pipe = diffusers.DDPMPipeline(unet=_pixel_unet(sample_size),
                                      scheduler=diffusers.DDPMScheduler(prediction_type=prediction_type))
    else:   # DDPMPipeline as the container of a UNet and a flow-matching scheduler (unet/ and scheduler/)
        pipe = diffusers.DDPMPipeline(unet=_pixel_unet(sample_size),
                                      scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _text_unet(sample_size: int):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=TEXT_DIM, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _pixel_unet(sample_size: int):
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))


def _vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)


def _text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel
    vocab_size = _vocab_size()
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=16, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=TOKENS, projection_dim=TEXT_DIM,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return CLIPTextModel(config).eval()


def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet, each character alone and word-final (`</w>`), then the two special tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars])}
    return {**vocab, "<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}


def _vocab_size() -> int:
    return len(_byte_vocab())


def _tokenizer():
    from transformers import CLIPTokenizer
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(_byte_vocab()))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=TOKENS)
