"""Full-size architectures from config: Stable Diffusion 2.1 and DeepFloyd IF stage I, random weights.

The configs of the released models' components, so code paths can run at the real sizes on
machines that cannot download weights (bench/full_size.py, bench/sds_step.py --sd21). Nothing here
is for quality: the weights are random. Build on torch.device("meta") to count parameters for free.

- Stable Diffusion 2.1 (the 512 px base model): UNet2DConditionModel (865,910,724 parameters),
  AutoencoderKL (83,653,863), the OpenCLIP ViT-H/14 text tower as diffusers ships it (CLIPTextModel,
  1024 wide, 23 of OpenCLIP's 24 layers because SD 2 reads the penultimate layer: 340,387,840) and
  a DDPMScheduler with SD's scaled-linear betas.
- DeepFloyd IF stage I, M size: a pixel-space UNet (64 px in, eps and variance out, T5 features in).
  The layout follows diffusers' conversion of IF (scripts/convert_if.py: ResnetDownsample / SimpleCrossAttn
  blocks, scale-shift norms, text-pooled time embedding, 64-channel heads); the widths (192, 384,
  576, 768), 3 blocks per level and 768-wide cross-attention are a reconstruction that gives
  371,605,830 parameters against the model card's "400M"; the released config.json was not
  available here to check against. The T5-XXL encoder is 4,762,310,656 parameters (24 layers).
- Tokenizers cannot be downloaded either: synthetic_clip_tokenizer and synthetic_t5_tokenizer build
  real CLIPTokenizer / T5Tokenizer objects with generated vocabularies of the real sizes (49,408 BPE
  tokens; 32,000 unigram pieces + 100 sentinels), so every embedding table has its real shape.
"""

from __future__ import annotations

import json
import string
from itertools import product
from pathlib import Path

import torch

# ---- Stable Diffusion 2.1 (512 px base) ------------------------------------------------------

SD21_UNET = dict(
    sample_size=64,  # 64x64 latents = 512 px images (96 for the 768 px v-prediction model)
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)

SD21_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)

# OpenCLIP ViT-H/14's text tower in transformers' CLIPTextModel, as stable-diffusion-2-1 ships it.
SD21_TEXT_ENCODER = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    projection_dim=512,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=1,
)

SD21_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="epsilon",  # the 512 px base model; the 768 px model is v_prediction
    clip_sample=False,
    steps_offset=1,
)

SD_MAX_TOKENS = 77

# ---- DeepFloyd IF stage I ---------------------------------------------------------------------

IF_I_M_UNET = dict(
    sample_size=64,
    in_channels=3,
    out_channels=6,  # eps and the learned variance range
    layers_per_block=3,
    block_out_channels=(192, 384, 576, 768),
    down_block_types=(
        "ResnetDownsampleBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
    ),
    up_block_types=(
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "ResnetUpsampleBlock2D",
    ),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    cross_attention_dim=768,
    attention_head_dim=64,
    encoder_hid_dim=4096,
    encoder_hid_dim_type="text_proj",
    addition_embed_type="text",
    addition_embed_type_num_heads=64,
    act_fn="gelu",
    resnet_time_scale_shift="scale_shift",
    cross_attention_norm="group_norm",
    upcast_attention=False,
)

# google/t5-v1_1-xxl's encoder (what IF uses); num_layers is 24 in the real model.
T5_XXL_ENCODER = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)

IF_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    variance_type="learned_range",
    prediction_type="epsilon",
    thresholding=True,
    dynamic_thresholding_ratio=0.95,
    sample_max_value=1.5,
)

IF_MAX_TOKENS = 77

# Parameter counts of the configs above (tests/test_full_size.py checks them on the meta device).
EXPECTED_PARAMS = {
    "sd21.unet": 865_910_724,
    "sd21.vae": 83_653_863,
    "sd21.text_encoder": 340_387_840,
    "if_m.unet": 371_605_830,
    "if_m.text_encoder": 4_762_310_656,  # T5-XXL encoder, 24 layers
}


# ---- builders -------------------------------------------------------------------------------


def n_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sd21_unet(**overrides):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**SD21_UNET, **overrides})


def sd21_vae(**overrides):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**SD21_VAE, **overrides})


def sd21_text_encoder(**overrides):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**{**SD21_TEXT_ENCODER, **overrides}))


def sd21_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD21_SCHEDULER)


def if_m_unet(**overrides):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**IF_I_M_UNET, **overrides})


def t5_xxl_encoder(num_layers: int | None = None):
    """T5-XXL's encoder; num_layers < 24 keeps every width and cuts depth (clearly not the real model)."""
    from transformers import T5Config, T5EncoderModel

    cfg = dict(T5_XXL_ENCODER)
    if num_layers is not None:
        cfg["num_layers"] = int(num_layers)
    return T5EncoderModel(T5Config(**cfg))


def if_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**IF_SCHEDULER)


def t5_layer_params() -> int:
    """Parameters one T5-XXL encoder layer adds (to size a truncated encoder against the real one)."""
    with torch.device("meta"):
        return n_parameters(t5_xxl_encoder(2)) - n_parameters(t5_xxl_encoder(1))


# ---- tokenizers -------------------------------------------------------------------------------


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte -> printable character table (256 characters, in CLIP's vocabulary order)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def synthetic_clip_tokenizer(vocab_size: int = 49408, model_max_length: int = SD_MAX_TOKENS, pad_token: str = "!"):
    """A CLIPTokenizer with a generated BPE vocabulary of CLIP's size and layout: the 256 byte
    characters, the same with '</w>', merges, then <|startoftext|> and <|endoftext|> last (ids
    49406 / 49407 at the real size). Merges: lowercase letter pairs, then triples, then byte pairs,
    word-final forms included, so English words split into a few tokens. SD 2 pads with '!' (id 0)."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars]
    n_merges = vocab_size - len(vocab) - 2
    if n_merges < 0:
        raise ValueError(f"vocab_size must be at least {len(vocab) + 2}")
    letters = string.ascii_lowercase
    merges: list[tuple[str, str]] = []
    seen = set(vocab)

    def add(a: str, b: str) -> None:
        token = a + b
        if token not in seen and len(merges) < n_merges:
            seen.add(token)
            merges.append((a, b))
            vocab.append(token)

    for a, b in product(letters, repeat=2):
        add(a, b)
        add(a, b + "</w>")
    for a, b, c in product(letters, repeat=3):
        add(a + b, c)
        add(a + b, c + "</w>")
    for a, b in product(chars, repeat=2):
        if len(merges) >= n_merges:
            break
        add(a, b)
        add(a, b + "</w>")
    if len(merges) < n_merges:
        raise ValueError(f"could not generate {n_merges} merges")
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=model_max_length, pad_token=pad_token
    )


def synthetic_t5_tokenizer(n_pieces: int = 32000, extra_ids: int = 100, model_max_length: int = IF_MAX_TOKENS):
    """A T5Tokenizer (unigram) with a generated vocabulary of T5's size: <pad> </s> <unk>, then
    single characters, then lowercase letter pairs and triples with and without the word-start mark,
    then 100 sentinels (<extra_id_*>) as in t5-v1_1: 32,100 tokens, ids < the encoder's 32,128 rows."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    singles = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    candidates = [(c, -4.0) for c in singles] + [("\u2581" + c, -3.5) for c in singles]
    for k, score in ((2, -6.0), (3, -7.0)):
        for combo in product(string.ascii_lowercase, repeat=k):
            word = "".join(combo)
            candidates += [("\u2581" + word, score + 0.5), (word, score)]
    for piece, score in candidates:
        if len(pieces) >= n_pieces:
            break
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))
    if len(pieces) < n_pieces:
        raise ValueError(f"could not generate {n_pieces} pieces")
    return T5Tokenizer(vocab=pieces, extra_ids=extra_ids, model_max_length=model_max_length)


# ---- diffusers folders --------------------------------------------------------------------------


def save_component(folder, name: str, obj) -> list[str]:
    """Save one pipeline component the way diffusers' save_pretrained lays it out (safetensors for
    weights); returns its model_index.json entry [library, class]."""
    folder = Path(folder)
    kwargs = {} if name in ("tokenizer", "scheduler") else {"safe_serialization": True}
    obj.save_pretrained(folder / name, **kwargs)
    lib = "diffusers" if type(obj).__module__.startswith("diffusers") else "transformers"
    return [lib, type(obj).__name__]


def write_model_index(folder, entries: dict[str, list[str]], kind: str) -> Path:
    """model_index.json for a StableDiffusionPipeline ("sd") or IFPipeline ("if") folder."""
    import diffusers

    index = {
        "_class_name": "IFPipeline" if kind == "if" else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
    }
    index.update(entries)
    if kind == "sd":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    else:
        index.update(
            safety_checker=[None, None],
            feature_extractor=[None, None],
            watermarker=[None, None],
            requires_safety_checker=False,
        )
    path = Path(folder) / "model_index.json"
    path.write_text(json.dumps(index, indent=2) + "\n")
    return path
