"""The embedded toy prior's components: word-level tokenizer, tiny CLIP text encoder, pixel UNet.

Everything is built from config here (no downloads) and saved in diffusers' save_pretrained
layout, so the shipped folder loads like any other diffusers model:

    model_index.json, t3d_prior.json
    scheduler/  text_encoder/  tokenizer/  unet/
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from t3d.render.cameras import VIEW_SUFFIXES
from t3d.toy.world import COLOURS, SHAPES

TOY_KIND = "t3d-toy"
TOY_PIPELINE_CLASS = "T3DToyPriorPipeline"
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"

PAD, UNK = "[PAD]", "[UNK]"
MAX_TOKENS = 12
TEXT_DIM = 64

# A few words beyond the toy world's, so near-miss prompts map to known tokens.
EXTRA_WORDS = ("a", "an", "the", "of", "view", "front", "side", "back", "overhead", ",", ".")
# Toy world v2's words: "a red cube with a black spot", "a red object".
WORLD_V2_WORDS = ("with", "black", "spot", "object")


def toy_vocab() -> list[str]:
    words = [PAD, UNK] + list(EXTRA_WORDS) + list(COLOURS) + list(SHAPES) + list(WORLD_V2_WORDS)
    for suffix in VIEW_SUFFIXES.values():
        for w in suffix.replace(",", " , ").split():
            if w not in words:
                words.append(w)
    return words


def unknown_words(prompt: str, folder: str | Path = EMBEDDED_DIR) -> list[str]:
    """Words of `prompt` that a word-level toy prior has no token for, in order, once each.

    Its tokenizer maps them to [UNK], so the prior ignores them: "a purple cube" is drawn as "a cube"
    in any colour. Read from the folder's own tokenizer.json, the vocabulary it was trained with."""
    import re

    model = json.loads((Path(folder) / "tokenizer" / "tokenizer.json").read_text())["model"]
    if model.get("type") != "WordLevel":
        return []
    known = set(model["vocab"])
    words = re.findall(r"\w+|[^\w\s]+", prompt.lower())  # the Whitespace pre-tokenizer's split
    return [w for w in dict.fromkeys(words) if w not in known]


def build_toy_tokenizer():
    """Word-level tokenizer (lower-cased, split on whitespace and punctuation), padded to MAX_TOKENS."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(toy_vocab())}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, model_max_length=MAX_TOKENS, padding_side="right"
    )


def build_toy_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        projection_dim=TEXT_DIM,
    )
    return CLIPTextModel(cfg)


def toy_unet_config(image_size: int = 32, text_time_embedding: bool = False) -> dict:
    """Small pixel-space UNet: cross-attention on text tokens at the 8x8 level and in the middle.

    Attention at 16x16 and above costs most of the CPU time for little gain on this data.
    """
    return dict(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=16,
        norm_num_groups=16,
        # Optionally also add an attention-pooled text embedding to the time embedding, so the
        # prompt reaches every ResNet block (diffusers' addition_embed_type="text").
        **({"addition_embed_type": "text", "addition_embed_type_num_heads": 4} if text_time_embedding else {}),
    )


def build_toy_unet(image_size: int = 32, text_time_embedding: bool = False):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**toy_unet_config(image_size, text_time_embedding))


def build_toy_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
        clip_sample=True,
    )


def save_toy_folder(folder, tokenizer, text_encoder, unet, scheduler, meta: dict) -> Path:
    """Write the diffusers layout (safetensors) plus t3d_prior.json with the toy prior's metadata."""
    import diffusers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": TOY_PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    meta = {"kind": TOY_KIND, "space": "pixel", "image_size": int(unet.config.sample_size), **meta}
    (folder / "t3d_prior.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def encode_tokens(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    """Same tokenization as DiffusionPrior.encode_text, but differentiable (for training)."""
    tokens = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return text_encoder(tokens.input_ids.to(device))[0]
