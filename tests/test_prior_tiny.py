"""Tiny random-weight priors and the real loading code for SD- and IF-style folders."""

import json
import time

import pytest
import torch

from t3d.priors import DiffusionPrior, PriorNotFoundError, build_tiny_prior, load_prior, prior_identity
from t3d.priors.tiny import save_tiny_pipeline


@pytest.fixture(scope="module")
def pixel():
    return build_tiny_prior("pixel", seed=0)


@pytest.fixture(scope="module")
def latent():
    return build_tiny_prior("latent", seed=0)


def _cfg_checks(prior: DiffusionPrior, x: torch.Tensor):
    cond = prior.encode_text(["a red cube, front view"] * x.shape[0])
    uncond = prior.encode_text([""] * x.shape[0])
    assert not torch.allclose(cond, uncond)
    t = torch.tensor([500] * x.shape[0])
    eps_c = prior.predict_noise(x, t, cond)
    eps_u = prior.predict_noise(x, t, uncond)
    eps_g = prior.predict_noise(x, t, cond, uncond, guidance_scale=7.5)
    assert eps_g.shape == x.shape and eps_g.dtype == prior.dtype
    assert not torch.allclose(eps_c, eps_u)
    # CFG is uncond + s * (cond - uncond), computed in one batched call.
    torch.testing.assert_close(eps_g, eps_u + 7.5 * (eps_c - eps_u), rtol=1e-3, atol=1e-4)
    return eps_g


def test_tiny_pixel_shapes(pixel):
    assert pixel.identity == "tiny-pixel-s0" and pixel.space == "pixel" and pixel.image_size == 32
    emb = pixel.encode_text(["a red cube", ""])
    assert emb.shape == (2, 16, 32) and emb.dtype == torch.float32
    x = pixel.images_to_model(torch.rand(2, 3, 64, 64))
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    _cfg_checks(pixel, x)
    assert pixel.num_train_timesteps == 1000 and pixel.alphas_cumprod.shape == (1000,)
    assert pixel.model_to_images(x).shape == (2, 3, 32, 32)


def test_tiny_latent_goes_through_vae(latent):
    assert latent.identity == "tiny-latent-s0" and latent.space == "latent" and latent.vae is not None
    rgb = torch.rand(2, 3, 32, 32, requires_grad=True)
    z = latent.images_to_model(rgb)
    assert z.shape == (2, 4, 16, 16)
    z.square().sum().backward()  # differentiable through the VAE encoder
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    _cfg_checks(latent, z.detach())
    assert latent.model_to_images(z.detach()).shape == (2, 3, 32, 32)


def test_tiny_is_deterministic_per_seed():
    a, b, c = build_tiny_prior("pixel", 0), build_tiny_prior("pixel", 0), build_tiny_prior("pixel", 1)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300])
    outs = [p.predict_noise(x, t, p.encode_text(["a blue cone"])) for p in (a, b, c)]
    assert torch.equal(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])
    assert c.identity == "tiny-pixel-s1"


def test_tiny_unet_is_fast(pixel):
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    cond = pixel.encode_text(["a", "b"])
    pixel.predict_noise(x, t, cond)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        pixel.predict_noise(x, t, cond)
        best = min(best, time.perf_counter() - t0)
    assert best < 0.25  # ~0.02 s on an idle 2-core machine; loose for shared CI runners


def test_add_noise_matches_schedule(pixel):
    x0, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 500, 999])
    xt = pixel.add_noise(x0, noise, t)
    a = pixel.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * noise)


def test_v_prediction_is_converted_to_eps():
    from diffusers import DDPMScheduler

    prior = build_tiny_prior("pixel", 0)
    prior.scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([100, 800])
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(prior._eps(v, x_t, t), eps, rtol=1e-4, atol=1e-5)


def test_tiny_sources_through_load_prior():
    p = load_prior("tiny-latent-s2")
    assert p.identity == prior_identity("tiny-latent-s2") == "tiny-latent-s2" and p.space == "latent"


# ---- real loaders on folders saved from tiny components ------------------------------------------


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd", kind="sd", seed=0)


@pytest.fixture(scope="module")
def if_folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("if") / "tiny-if", kind="if", seed=0)


def test_sd_folder_loads_as_latent_prior(sd_folder):
    index = json.loads((sd_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert (sd_folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    prior = load_prior(str(sd_folder))
    assert prior.extra["family"] == "sd" and prior.space == "latent" and prior.vae is not None
    assert prior.image_size == 32 and prior.dtype == torch.float32
    assert type(prior.text_encoder).__name__ == "CLIPTextModel" and type(prior.tokenizer).__name__ == "CLIPTokenizer"
    z = prior.images_to_model(torch.rand(2, 3, 48, 48))
    assert z.shape == (2, 4, 16, 16)
    _cfg_checks(prior, z)
    # Same weights as the in-memory tiny components (the latent path is the real one).
    ref = build_tiny_prior("latent", 0)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([250])
    torch.testing.assert_close(
        prior.predict_noise(x, t, prior.encode_text(["a cube"])), ref.predict_noise(x, t, ref.encode_text(["a cube"]))
    )


def test_if_folder_loads_as_pixel_prior(if_folder):
    prior = load_prior(str(if_folder))
    assert prior.extra["family"] == "if" and prior.space == "pixel" and prior.vae is None
    assert type(prior.text_encoder).__name__ == "T5EncoderModel"
    assert prior.extra.get("text_attention_mask") is True
    assert prior.unet.config.out_channels == 6  # (eps, variance): the interface keeps eps
    x = prior.images_to_model(torch.rand(2, 3, 32, 32))
    assert x.shape == (2, 3, 32, 32)
    _cfg_checks(prior, x)


def test_fp16_is_respected_when_asked(sd_folder):
    prior = load_prior(str(sd_folder), dtype=torch.bfloat16)
    assert prior.dtype == torch.bfloat16
    assert next(prior.unet.parameters()).dtype == torch.bfloat16
    assert next(prior.vae.parameters()).dtype == torch.bfloat16


def test_folder_identity_is_content_hash(tmp_path, sd_folder):
    ident = prior_identity(str(sd_folder))
    assert ident.startswith("local-sd:tiny-sd@") and len(ident.split("@")[1]) == 12
    assert prior_identity(str(sd_folder)) == ident
    copy = save_tiny_pipeline(tmp_path / "tiny-sd", kind="sd", seed=0)
    assert prior_identity(str(copy)) == ident  # same bytes, same name
    other = save_tiny_pipeline(tmp_path / "other" / "tiny-sd", kind="sd", seed=1)
    assert prior_identity(str(other)) != ident
    assert load_prior(str(sd_folder)).identity == ident


def test_hub_identity_without_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert prior_identity("someone/some-model") == "hub:someone/some-model@unresolved"


def test_missing_folder_gives_clear_error():
    with pytest.raises(PriorNotFoundError) as e:
        load_prior("./no/such/model/folder")
    msg = str(e.value)
    assert "does not exist" in msg and "local folder" in msg and "HF_HUB_OFFLINE" in msg


def test_missing_hub_model_gives_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path), raising=False)
    with pytest.raises(PriorNotFoundError) as e:
        load_prior("someone/not-a-cached-model")
    msg = str(e.value)
    assert "someone/not-a-cached-model" in msg
    assert "HF_HUB_OFFLINE" in msg and "local folder" in msg and "cache" in msg


def test_not_a_model_folder(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(PriorNotFoundError, match="not a diffusers model folder"):
        load_prior(str(tmp_path))


def test_hub_id_loads_from_local_cache_offline(tmp_path):
    """A hub id resolves through the HF cache layout (refs/main -> snapshots/<hash>) with no network."""
    import os
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--toyorg--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    save_tiny_pipeline(repo / "snapshots" / commit, kind="sd")
    code = (
        "from t3d.priors import load_prior, prior_identity\n"
        "p = load_prior('toyorg/tiny-sd')\n"
        "print(prior_identity('toyorg/tiny-sd'), p.identity, p.space, p.extra['family'])\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ident = f"hub:toyorg/tiny-sd@{commit}"
    assert out.stdout.split() == [ident, ident, "latent", "sd"]
