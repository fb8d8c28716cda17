"""Best-of-N: score finished results with the prior itself, so one prompt's seeds can be ranked.

The score of a result is how much the prompt helps the prior explain renders of it: noise the
renders at fixed timesteps, predict the noise with and without the prompt, and average
||eps_uncond - eps||^2 - ||eps_cond - eps||^2. A denoiser's error bounds the log-likelihood
(the diffusion ELBO), so this difference estimates log p(x | y) - log p(x), the pointwise mutual
information between the renders and the prompt (the "diffusion classifier" reading of a
text-to-image model). It needs no extra model, rewards what the prompt asks for rather than
what any image looks like, and uses the same renders, shading and view prompts the texture
stage scores the mesh with, so it judges what the pipeline optimised.

Everything random is fixed (views, timesteps, and the noise from a generator seeded with `seed`):
the same file always gets the same score, and two seeds' results are scored against the same
noise, which keeps noise out of their difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from t3d.mesh.export import TexturedMesh, load_textured
from t3d.render.cameras import CameraBatch, CameraParams, orbit_cameras, view_names, view_prompt
from t3d.render.raster import RasterBackend
from t3d.render.textured import render_lit_textured

# Where the toy prior's prediction depends on the prompt: scoring true primitives ("a red cube",
# "a blue sphere") against wrong ones (other colour and/or shape), the right object's margin is
# largest at t = 400-600, positive at 300 and 700, and noise below 200 and above 800.
DEFAULT_TIMESTEPS = (300, 400, 500, 600, 700)
ELEVATION_DEG = 15.0  # the turntables' and the toy metrics' orbit elevation
AMBIENT = 0.35  # the texture stage's default lambertian ambient


@dataclass
class SeedScore:
    """One result's score (higher: the prompt explains its renders better) and its two mean errors."""

    score: float  # mean of err_uncond - err_cond over views x timesteps x noises
    err_cond: float  # mean squared noise-prediction error with the (view) prompt
    err_uncond: float  # ... with the negative prompt (empty: unconditional)
    n_evals: int  # renders x timesteps x noises scored


def render_for_prior(
    tmesh: TexturedMesh,
    cameras: CameraBatch,
    size: int,
    *,
    raster: RasterBackend,
    device="cpu",
    ambient: float = AMBIENT,
) -> torch.Tensor:
    """[B,3,H,W] in [0,1]: the textured mesh as the texture stage shows it to the prior (texture
    looked up by UV, lambertian under the camera-fixed light, no antialiasing, on white)."""
    rgb, _ = render_lit_textured(
        tmesh.verts,
        tmesh.faces,
        tmesh.uvs,
        tmesh.texture,
        cameras,
        size,
        raster=raster,
        ambient=ambient,
        antialias=False,
        device=device,
    )
    return rgb


@torch.no_grad()
def score_renders(
    prior,
    rgb: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    n_noise: int = 2,
    seed: int = 0,
) -> SeedScore:
    """The score of renders rgb [V,3,H,W] with per-view embeddings cond [V,L,D] against uncond [1,L,D].

    One UNet call per timestep carries every view x noise draw, with and without the prompt.
    Errors are means over the elements of each prediction, so they do not grow with image size."""
    with torch.random.fork_rng(devices=[prior.device] if prior.device.type == "cuda" else []):
        torch.manual_seed(seed)  # a latent prior's VAE samples its posterior: fixed, like the noise
        x0 = prior.images_to_model(rgb.to(prior.device)).float()
    n_views = x0.shape[0]
    gen = torch.Generator().manual_seed(seed)
    emb = torch.cat([cond.repeat(n_noise, 1, 1), uncond.expand(n_views * n_noise, -1, -1)]).to(prior.device)
    err_cond, err_uncond = [], []
    for t_int in timesteps:
        noise = torch.randn((n_noise * n_views, *x0.shape[1:]), generator=gen).to(prior.device)
        t = torch.full((n_noise * n_views,), int(t_int), dtype=torch.long, device=prior.device)
        x_t = prior.add_noise(x0.repeat(n_noise, 1, 1, 1), noise, t)
        eps = prior.predict_noise(torch.cat([x_t, x_t]), torch.cat([t, t]), emb).float()
        e_c, e_u = eps.chunk(2)
        err_cond.append((e_c - noise).pow(2).flatten(1).mean(1))
        err_uncond.append((e_u - noise).pow(2).flatten(1).mean(1))
    e_c, e_u = torch.cat(err_cond), torch.cat(err_uncond)
    return SeedScore(
        score=float((e_u - e_c).mean()),
        err_cond=float(e_c.mean()),
        err_uncond=float(e_u.mean()),
        n_evals=int(e_c.numel()),
    )


def score_result(
    prior,
    glb_path: str | Path,
    prompt: str,
    camera: CameraParams,
    *,
    raster: RasterBackend,
    device="cpu",
    negative_prompt: str = "",
    n_views: int = 8,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    n_noise: int = 2,
    seed: int = 0,
    view_prompts: bool = True,
    render_size: int | None = None,
) -> SeedScore:
    """Score an exported GLB (y-up, as export writes it) for `prompt` with the prior (module doc).

    Views: `n_views` azimuths evenly from the front (0 deg) at ELEVATION_DEG, the flow camera's
    radius and fov. `view_prompts`: each view gets DreamFusion's suffix (", side view"), as
    encode_prompt and the stages do by default. `render_size` None: twice the prior's image size
    (64 px for the toy prior, the texture stage's raster size), which images_to_model brings down
    to the prior's size with antialiasing."""
    tmesh = load_textured(glb_path, y_up=True)
    cams = orbit_cameras(camera, n_views, elevation_deg=ELEVATION_DEG, start_deg=0.0)
    rgb = render_for_prior(tmesh, cams, render_size or 2 * prior.image_size, raster=raster, device=device)
    names = view_names(cams, camera)
    texts = [view_prompt(prompt, n) if view_prompts else prompt for n in names]
    unique = list(dict.fromkeys(texts))
    encoded = prior.encode_text([*unique, negative_prompt])
    cond = encoded[[unique.index(t) for t in texts]]
    return score_renders(prior, rgb, cond, encoded[-1:], timesteps=timesteps, n_noise=n_noise, seed=seed)


def rank_seeds(scores: dict[int, SeedScore]) -> list[int]:
    """Seeds best first (highest score); equal scores go to the lower seed."""
    return sorted(scores, key=lambda s: (-scores[s].score, s))
