"""Tiny random-weight priors built from config: real diffusers/transformers classes, toy sizes.

They exercise every code path (tokenizer -> text encoder -> UNet with cross-attention -> VAE for
the latent space) in milliseconds on a CPU, deterministically for a seed. They are for shapes,
dtypes and speed in tests, never for quality. `save_tiny_pipeline` writes Stable Diffusion- and
DeepFloyd IF-style folders (model_index.json + components) so the real loaders can be tested.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

import torch

from .base import DiffusionPrior

TINY_TEXT_DIM = 32
TINY_MAX_TOKENS = 16
_CHARS = string.ascii_lowercase + string.digits + ",.'-"


def tiny_clip_tokenizer():
    """A character-level CLIPTokenizer (BPE with no merges) built in memory."""
    from transformers import CLIPTokenizer

    words = ["<|startoftext|>", "<|endoftext|>"] + list(_CHARS) + [c + "</w>" for c in _CHARS]
    return CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=[], model_max_length=TINY_MAX_TOKENS)


def tiny_t5_tokenizer():
    """A character-level T5Tokenizer (unigram) built in memory."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=TINY_MAX_TOKENS)


def tiny_clip_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TINY_MAX_TOKENS,
        projection_dim=TINY_TEXT_DIM,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(cfg)


def tiny_t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=TINY_TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
    )
    return T5EncoderModel(cfg)


def tiny_unet(sample_size: int, channels: int, out_channels: int | None = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=out_channels or channels,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_vae(sample_size: int):
    """Two levels: the latent is half the image size with 4 channels (SD's layout, smaller factor)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
        scaling_factor=0.18215,
    )


def tiny_scheduler(kind: str = "sd"):
    from diffusers import DDPMScheduler

    if kind == "if":
        return DDPMScheduler(
            num_train_timesteps=1000,
            beta_schedule="squaredcos_cap_v2",
            variance_type="learned_range",
            prediction_type="epsilon",
        )
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
    )


def tiny_components(kind: Literal["sd", "if", "pixel"] = "sd", seed: int = 0, image_size: int = 32) -> dict:
    """Random-weight components, deterministic for `seed` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "if":
            tokenizer = tiny_t5_tokenizer()
            text_encoder = tiny_t5_encoder(len(tokenizer))
            unet = tiny_unet(image_size, 3, out_channels=6)  # IF predicts (eps, variance)
            return dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=tiny_scheduler("if"))
        tokenizer = tiny_clip_tokenizer()
        text_encoder = tiny_clip_text_encoder(len(tokenizer))
        if kind == "sd":
            vae = tiny_vae(image_size)
            unet = tiny_unet(image_size // 2, 4)
            return dict(
                tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae, scheduler=tiny_scheduler("sd")
            )
        if kind == "pixel":
            unet = tiny_unet(image_size, 3)
            return dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=tiny_scheduler("sd"))
    raise ValueError(f"unknown tiny kind {kind!r}: use 'sd', 'if' or 'pixel'")


def build_tiny_prior(
    space: Literal["pixel", "latent"] = "pixel", seed: int = 0, image_size: int = 32
) -> DiffusionPrior:
    """A real (random-weight) prior for tests: fast on CPU and deterministic for a seed.

    "pixel" is a CLIP-conditioned pixel UNet; "latent" adds a tiny AutoencoderKL (latent = image/2).
    """
    if space not in ("pixel", "latent"):
        raise ValueError(f"space must be 'pixel' or 'latent', not {space!r}")
    comps = tiny_components("sd" if space == "latent" else "pixel", seed=seed, image_size=image_size)
    for name in ("text_encoder", "unet", "vae"):
        if name in comps:
            comps[name].eval().requires_grad_(False)
    identity = f"tiny-{space}-s{seed}" + ("" if image_size == 32 else f"-{image_size}px")
    return DiffusionPrior(
        identity=identity,
        space=space,
        image_size=image_size,
        tokenizer=comps["tokenizer"],
        text_encoder=comps["text_encoder"],
        unet=comps["unet"],
        scheduler=comps["scheduler"],
        vae=comps.get("vae"),
        extra={"kind": "tiny"},
    )


def save_tiny_pipeline(folder, kind: Literal["sd", "if"] = "sd", seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny Stable Diffusion- or DeepFloyd IF-style folder (diffusers layout, safetensors)."""
    from .configs import save_component, write_model_index

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    comps = tiny_components(kind, seed=seed, image_size=image_size)
    write_model_index(folder, {name: save_component(folder, name, obj) for name, obj in comps.items()}, kind)
    return folder
