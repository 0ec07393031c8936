"""A latent text-to-image pipeline (Stable Diffusion layout) as one σ-space denoiser over latents.

`TextToImageDenoiser` wraps the UNet's σ-space denoiser (`VPDenoiser` on a DDPM table, or `FlowDenoiser`)
with the pipeline's VAE, CLIP text encoder and tokenizer, so that prompts are conditions like any other:

    D(x_latent, sigma, prompt="a cat")          # or prompt=[B strings], or encoder_hidden_states=[B, tokens, dim]
    CFGDenoiser(D, w=3.0, uncond=D.null_condition)   # prompt -> negative_prompt (or "")
    images = D.decode(latents)                  # [B, 3, H, W] in [0, 1]

Prompts are encoded once each (padded to the tokenizer's length, as diffusers' pipelines do) and cached.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from difflab.core.errors import ConfigError, ShapeError


class TextToImageDenoiser(nn.Module):
    """D(x, sigma, prompt=None, negative_prompt=None, encoder_hidden_states=None, **cond) -> x0_hat (latents).

    x: [B, C, h, w] latents (`data_shape`); prompt: a str (used for the whole batch) or a list of B (or 1)
    strings; with neither prompt nor encoder_hidden_states the empty prompt "" (the unconditional model).
    negative_prompt is read only by `null_condition` (classifier-free guidance) and ignored here.
    denoiser: the UNet's σ-space denoiser; vae: an AutoencoderKL; text_encoder, tokenizer: CLIP's.
    """

    CACHE_SIZE = 256   # prompts kept encoded; the oldest is dropped beyond this

    def __init__(self, denoiser: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any):
        super().__init__()
        self.denoiser, self.vae, self.text_encoder, self.tokenizer = denoiser, vae, text_encoder, tokenizer
        self.sigma_min, self.sigma_max = denoiser.sigma_min, denoiser.sigma_max
        self.data_shape = denoiser.data_shape
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.image_shape = (vae.config.out_channels, *(n * self.vae_scale for n in self.data_shape[1:]))
        self._prompt_cache: OrderedDict[str, Tensor] = OrderedDict()

    @property
    def vae_scale(self) -> int:
        """Image pixels per latent pixel (8 in Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def forward(self, x: Tensor, sigma: Tensor, prompt: str | Sequence[str] | None = None,
                negative_prompt: str | Sequence[str] | None = None, encoder_hidden_states: Tensor | None = None,
                **cond: Any) -> Tensor:
        if encoder_hidden_states is None:
            encoder_hidden_states = self.embed(prompt, x.shape[0])
        elif prompt is not None:
            raise ConfigError("pass either prompt= or encoder_hidden_states=, not both")
        return self.denoiser(x, sigma, encoder_hidden_states=encoder_hidden_states.to(x.device), **cond)

    def embed(self, prompt: str | Sequence[str] | None, batch: int) -> Tensor:
        """The [batch, tokens, dim] text embeddings of `prompt` (a str or 1 string broadcast, or `batch` strings)."""
        prompts = per_sample_prompts("" if prompt is None else prompt, batch)
        distinct = list(dict.fromkeys(prompts))
        table = self.encode_prompts(distinct)
        rows = torch.tensor([distinct.index(p) for p in prompts], device=table.device)
        return table[rows]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """CLIP's last hidden state of each prompt, [N, tokens, dim] (text encoder's dtype and device); each
        string is encoded once, in one batch with the others not yet seen, then served from the cache."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            for prompt, embedding in zip(missing, self._encode(missing)):
                self._prompt_cache[prompt] = embedding
        for prompt in prompts:
            self._prompt_cache.move_to_end(prompt)
        while len(self._prompt_cache) > max(self.CACHE_SIZE, len(prompts)):
            self._prompt_cache.popitem(last=False)
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def _encode(self, prompts: list[str]) -> Tensor:
        """diffusers' StableDiffusionPipeline.encode_prompt without guidance: padded to model_max_length."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = tokens.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) \
            else None
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]

    def null_condition(self, cond: dict[str, Any]) -> dict[str, Any]:
        """The unconditional counterpart of `cond` for `CFGDenoiser`: prompt -> negative_prompt (default ""),
        or given encoder_hidden_states -> the empty prompt's embedding."""
        if "encoder_hidden_states" in cond and cond.get("prompt") is None:
            hidden = cond["encoder_hidden_states"]
            negative = cond.get("negative_prompt")
            null = self.embed("" if negative is None else negative, hidden.shape[0])
            return {**cond, "encoder_hidden_states": null.to(hidden)}
        negative = cond.get("negative_prompt")
        return {**cond, "prompt": "" if negative is None else negative}

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1] (latents' dtype), the VAE in its own dtype."""
        dtype = next(self.vae.parameters()).dtype
        z = latents.to(dtype) / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z, return_dict=False)[0]
        return (images / 2 + 0.5).clamp(0, 1).to(latents.dtype)

    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] -> latents [B, C, h, w] (images' dtype): the posterior's mean, or a
        sample from it with `generator` (as diffusers' img2img pipelines do)."""
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.image_shape):
            raise ShapeError(f"images must be [B, *{tuple(self.image_shape)}] in [0, 1], got {tuple(images.shape)}")
        dtype = next(self.vae.parameters()).dtype
        posterior = self.vae.encode((images * 2 - 1).to(dtype), return_dict=False)[0]
        z = posterior.mode() if generator is None else posterior.sample(generator)
        return ((z - self.shift_factor) * self.scaling_factor).to(images.dtype)

    @property
    def last_feature(self) -> Tensor | None:
        return getattr(self.denoiser, "last_feature", None)


def per_sample_prompts(prompt: str | Sequence[str], batch: int) -> list[str]:
    """`batch` prompt strings: a str or a 1-list broadcast, a list of `batch` kept."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"prompt must be a str or a list of str, got {prompt!r}")
    if len(prompts) == 1:
        return prompts * batch
    if len(prompts) != batch:
        raise ShapeError(f"got {len(prompts)} prompts for a batch of {batch}; pass one prompt or one per sample")
    return prompts


TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
TEXT_ENCODERS = ("CLIPTextModel",)


def load_text_components(folder, torch_dtype: torch.dtype, variant: str | None, names: dict[str, str]):
    """(vae, text_encoder, tokenizer) of a pipeline folder, safetensors only. names: the classes
    model_index.json gives ({"vae": ..., "text_encoder": ..., "tokenizer": ...}), checked against the
    allow-lists. Errors from the libraries come back as they are (the caller turns them into one line)."""
    import transformers
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True, variant=variant,
                                        torch_dtype=torch_dtype)
    text_encoder = getattr(transformers, names["text_encoder"]).from_pretrained(
        folder / "text_encoder", use_safetensors=True, variant=variant, dtype=torch_dtype)
    tokenizer = getattr(transformers, names["tokenizer"]).from_pretrained(folder / "tokenizer")
    return vae, text_encoder.to(torch_dtype).eval(), tokenizer   # .to: transformers < 4.56 has no dtype=
