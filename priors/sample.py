"""Sampling images from any prior (DDIM, classifier-free guidance) and saving PNG grids."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .base import DiffusionPrior


def _ddim_for(prior: DiffusionPrior):
    from diffusers import DDIMScheduler

    cfg = dict(prior.scheduler.config)
    keep = {
        k: cfg[k]
        for k in (
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "prediction_type",
            "clip_sample",
            "clip_sample_range",
            "steps_offset",
            "timestep_spacing",
            "rescale_betas_zero_snr",
        )
        if k in cfg
    }
    keep["prediction_type"] = "epsilon"  # predict_noise always returns epsilon
    # No x0 clipping (nor diffusers' dynamic thresholding): measured on the toy prior, clipping
    # the guided x0 estimate to [-1, 1] turns CFG >= 2 into *anti*-guidance (a red cube prompt
    # gives yellow tori; colour accuracy 0.1 at CFG 7.5 with either, 1.0 without).
    keep["clip_sample"] = False
    keep["thresholding"] = False
    keep["set_alpha_to_one"] = False
    return DDIMScheduler(**keep)


@torch.no_grad()
def sample_images(
    prior: DiffusionPrior,
    prompts: list[str],
    n: int = 1,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """n samples per prompt (prompt-major), RGB [len(prompts)*n, 3, H, W] in [0,1], deterministic for a seed."""
    all_prompts = [p for p in prompts for _ in range(n)]
    if not all_prompts:
        return torch.zeros(0, 3, prior.image_size, prior.image_size)
    unet_cfg = prior.unet.config
    size = unet_cfg.sample_size if isinstance(unet_cfg.sample_size, int) else unet_cfg.sample_size[0]
    gen = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn(len(all_prompts), unet_cfg.in_channels, size, size, generator=gen)
    uncond_one = prior.encode_text([""])
    sched = _ddim_for(prior)
    out = []
    chunks = range(0, len(all_prompts), batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chunks) * steps, desc="sampling", unit="step")
    for start in chunks:
        ps = all_prompts[start : start + batch_size]
        cond = prior.encode_text(ps)
        uncond = uncond_one.expand(len(ps), -1, -1)
        x = noise[start : start + batch_size].to(prior.device, prior.dtype)
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            tt = torch.full((len(ps),), int(t), device=prior.device, dtype=torch.long)
            eps = prior.predict_noise(x, tt, cond, uncond, guidance_scale=guidance)
            x = sched.step(eps.float(), int(t), x.float()).prev_sample.to(prior.dtype)
            if bar is not None:
                bar.update(1)
        out.append(prior.model_to_images(x).cpu())
    if bar is not None:
        bar.close()
    return torch.cat(out)


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> torch.Tensor:
    """[N,3,H,W] -> one [3, rows*(H+pad)+pad, cols*(W+pad)+pad] image on white."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = (
            images[i]
        )
    return grid


def save_png(image: torch.Tensor, path, upscale: int = 1) -> Path:
    """[3,H,W] in [0,1] -> PNG (nearest-neighbour upscaled by `upscale`)."""
    from PIL import Image

    img = image.clamp(0, 1)
    if upscale > 1:
        img = img.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
    arr = (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def sample_grid(
    prompt: str,
    n: int = 8,
    steps: int = 50,
    guidance: float | None = None,
    seed: int = 0,
    out="grid.png",
    prior: str | DiffusionPrior = "embedded",
    device: str = "cpu",
    upscale: int = 4,
) -> Path:
    """Sample n images for one prompt and write them as a PNG grid (what `t3d prior sample` runs)."""
    if isinstance(prior, str):
        from .loading import load_prior

        prior = load_prior(prior, device=device)
    guidance = prior.default_guidance_scale if guidance is None else guidance
    images = sample_images(prior, [prompt], n=n, steps=steps, guidance=guidance, seed=seed, progress=True)
    return save_png(image_grid(images, nrow=min(n, 8)), out, upscale=upscale if prior.image_size <= 128 else 1)
