"""Differentiable volume rendering of a NeRFField from a CameraBatch (pure torch, CPU or CUDA).

Rays (t3d.render.cameras.camera_rays, row 0 at the top) are clipped to the field's bounding sphere,
sampled in stratified bins, and alpha-composited front to back:
  alpha_i = 1 - exp(-sigma_i * delta_i),  w_i = alpha_i * prod_{j<i} (1 - alpha_j),
  rgb = sum_i w_i c_i + (1 - sum_i w_i) * background.
Shading follows DreamFusion: "albedo" (c = albedo), "lambertian" (c = albedo * (ambient +
diffuse * max(0, n.l))) and "textureless" (same with white albedo). Normals are only evaluated
at samples whose weight matters (they cost 3-6 extra density queries each).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from t3d.render.cameras import CameraBatch, camera_rays
from t3d.render.shading import LIGHT_CAM, Shading, shade


def ray_sphere(
    origins: torch.Tensor, dirs: torch.Tensor, radius: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry/exit distances of unit rays [R,3] through the origin-centred sphere; hit mask [R]."""
    b = (origins * dirs).sum(-1)
    c = origins.square().sum(-1) - radius**2
    disc = b * b - c
    root = disc.clamp_min(0).sqrt()
    near = (-b - root).clamp_min(0)
    far = -b + root
    return near, far, (disc > 0) & (far > near)


def light_directions(
    cameras: CameraBatch,
    light_dir: Sequence[float] | torch.Tensor | None = None,
    light_frame: Literal["camera", "world"] = "camera",
    random_light: bool = False,
    light_jitter: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Unit directions towards the light [B,3] in world space.

    Default: the toy world's light, fixed in each camera's frame. random_light perturbs it per
    view (DreamFusion samples the light around the camera), staying on the camera's side.
    """
    c2w = cameras.c2w.float()
    n = c2w.shape[0]
    base = torch.as_tensor(LIGHT_CAM if light_dir is None else light_dir, dtype=torch.float32)
    base = base.to(c2w.device).reshape(-1, 3).expand(n, 3)
    if light_frame == "world":
        base = torch.einsum("bji,bj->bi", c2w[:, :3, :3], base)  # world -> camera (rotation transpose)
    base = F.normalize(base, dim=-1)
    if random_light:
        noise = torch.randn(n, 3, generator=generator).to(c2w.device)
        base = F.normalize(base + light_jitter * noise, dim=-1)
        base = torch.cat([base[:, :2], base[:, 2:].abs()], -1)  # keep it in front of the object
    return torch.einsum("bij,bj->bi", c2w[:, :3, :3], base)


def _background(
    field, dirs: torch.Tensor, background, batch_index: torch.Tensor, n_views: int, generator
) -> torch.Tensor:
    if background is None:
        return field.background(dirs)
    if isinstance(background, str):
        if background == "white":
            return dirs.new_ones(dirs.shape[0], 3)
        if background == "black":
            return dirs.new_zeros(dirs.shape[0], 3)
        if background == "random":  # one random solid colour per view (augmentation)
            cols = torch.rand(n_views, 3, generator=generator).to(dirs.device)
            return cols[batch_index]
        if background == "field":
            return field.background(dirs)
        raise ValueError(f"unknown background {background!r}")
    bg = torch.as_tensor(background, dtype=dirs.dtype, device=dirs.device).reshape(-1, 3)
    return bg.expand(dirs.shape[0], 3) if bg.shape[0] == 1 else bg[batch_index]


class OccupancyGrid:
    """Coarse occupancy of the field's bounding cube (Instant-NGP style), to skip empty samples.

    `update` queries the density once per cell (at a jittered point), keeps a decaying maximum
    and dilates the occupied set, so surfaces can still grow. Samples in empty cells are not sent
    to the field (density 0, no gradient). On 2 CPU cores at 32 px this removes most of the
    field queries once the blob has shrunk to the object.
    """

    def __init__(self, bound: float, resolution: int = 32, threshold: float = 0.01, decay: float = 0.6, device="cpu"):
        self.bound, self.resolution, self.threshold, self.decay = (
            float(bound),
            int(resolution),
            float(threshold),
            float(decay),
        )
        self.density = torch.full(
            (self.resolution,) * 3, float("inf"), device=device
        )  # everything occupied until updated
        self.grid = torch.ones((self.resolution,) * 3, dtype=torch.bool, device=device)

    @torch.no_grad()
    def update(self, field, generator: torch.Generator | None = None, dilate: int = 1, chunk: int = 1 << 16) -> float:
        r = self.resolution
        device = self.density.device
        ar = torch.arange(r, device=device, dtype=torch.float32)
        cells = torch.stack(torch.meshgrid(ar, ar, ar, indexing="ij"), -1).reshape(-1, 3)
        jitter = torch.rand(cells.shape, generator=generator).to(device) if generator is not None else 0.5
        pts = ((cells + jitter) / r * 2 - 1) * self.bound
        dens = torch.cat([field.density(c) for c in pts.split(chunk)]).view(r, r, r).float()
        finite = torch.isfinite(self.density)
        self.density = torch.where(finite, torch.maximum(self.density * self.decay, dens), dens)
        occ = (self.density > self.threshold).float()
        if dilate > 0:
            occ = F.max_pool3d(occ[None, None], 2 * dilate + 1, stride=1, padding=dilate)[0, 0]
        self.grid = occ > 0
        return self.fraction()

    def query(self, points: torch.Tensor) -> torch.Tensor:
        ijk = ((points / self.bound + 1.0) * 0.5 * self.resolution).long().clamp(0, self.resolution - 1)
        return self.grid[ijk[:, 0], ijk[:, 1], ijk[:, 2]]

    def fraction(self) -> float:
        return float(self.grid.float().mean())

    def state_dict(self) -> dict:
        return {"density": self.density.clone(), "grid": self.grid.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.density = state["density"].to(self.density.device)
        self.grid = state["grid"].to(self.grid.device).bool()


def render(
    field,
    cameras: CameraBatch,
    size: int,
    *,
    n_samples: int = 64,
    shading: Shading = "albedo",
    light_dir: Sequence[float] | torch.Tensor | None = None,
    light_frame: Literal["camera", "world"] = "camera",
    random_light: bool = False,
    light_jitter: float = 0.5,
    ambient: float = 0.35,
    diffuse: float | None = None,
    background=None,
    perturb: bool = False,
    generator: torch.Generator | None = None,
    compute_normals: bool | None = None,
    normal_mode: Literal["surface", "sample"] = "surface",
    normal_weight_threshold: float = 1e-4,
    chunk_rays: int | None = None,
    occupancy: OccupancyGrid | None = None,
) -> dict:
    """Render `field` from every camera at size x size pixels.

    Returns images rgb/albedo [B,3,H,W] (in [0,1]), opacity/depth/orientation [B,1,H,W], normal
    [B,3,H,W] (world space, composited, zero where not computed), and per-sample tensors over the
    rays that hit the bounding sphere: weights [R,S], t [R,S], sample_normals [R,S,3] (or None),
    ray_dirs [R,3], ray_index [R] (into the flattened B*H*W pixels).
    `background`: None -> the field's own; "white" | "black" | "random" | "field" | RGB (3 or [B,3]).
    `chunk_rays` splits the march (for big images under no_grad). `occupancy` skips empty cells.

    normal_mode "sample" (DreamFusion): a normal per sample with weight > threshold, shading per
    sample. "surface" (default, ~5x cheaper on CPU): one normal per ray at the expected
    termination point (deferred shading, what a surface renderer does). The orientation inputs
    are returned either way as orient_weights [R,K] / orient_normals [R,K,3] (K = S or 1).
    """
    device = field.device
    cameras = cameras.to(device)
    n_views = len(cameras)
    diffuse = 1.0 - ambient if diffuse is None else diffuse
    if shading not in ("albedo", "lambertian", "textureless"):
        raise ValueError(f"unknown shading {shading!r}")
    need_normals = shading != "albedo" if compute_normals is None else (compute_normals or shading != "albedo")

    origins, dirs = camera_rays(cameras, size)
    o = origins.reshape(-1, 3)
    d = dirs.reshape(-1, 3)
    n_rays = o.shape[0]
    pix_per_view = size * size
    near, far, hit = ray_sphere(o, d, field.params.bound)
    ray_index = hit.nonzero(as_tuple=True)[0]
    batch_index = ray_index // pix_per_view
    lights = (
        light_directions(cameras, light_dir, light_frame, random_light, light_jitter, generator)
        if need_normals
        else None
    )

    chunks = [ray_index] if not chunk_rays else list(ray_index.split(chunk_rays))
    parts = []
    for idx in chunks:
        parts.append(
            _march(
                field,
                o[idx],
                d[idx],
                near[idx],
                far[idx],
                idx // pix_per_view,
                n_samples,
                shading,
                lights,
                ambient,
                diffuse,
                perturb,
                generator,
                need_normals,
                normal_mode,
                normal_weight_threshold,
                occupancy,
            )
        )
    per_ray = {k: torch.cat([p[k] for p in parts]) if parts[0][k] is not None else None for k in parts[0]}

    def scatter(values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        full = values.new_full((n_rays, values.shape[-1]), fill)
        return full.index_copy(0, ray_index, values)

    opacity = scatter(per_ray["opacity"][:, None])
    bg = _background(field, d, background, torch.arange(n_rays, device=device) // pix_per_view, n_views, generator)
    rgb = scatter(per_ray["rgb"]) + (1.0 - opacity) * bg
    albedo = scatter(per_ray["albedo"]) + (1.0 - opacity) * bg
    depth = scatter((per_ray["depth"] / per_ray["opacity"].clamp_min(1e-6))[:, None])
    normal = scatter(per_ray["normal"]) if need_normals else o.new_zeros(n_rays, 3)
    orient = scatter(per_ray["orient"][:, None]) if need_normals else o.new_zeros(n_rays, 1)

    def image(x: torch.Tensor) -> torch.Tensor:
        return x.view(n_views, size, size, -1).permute(0, 3, 1, 2)

    return {
        "rgb": image(rgb),  # in [0,1] by construction (weights sum <= 1); no clamp, no dead gradients
        "albedo": image(albedo),
        "opacity": image(opacity),
        "depth": image(depth),
        "normal": image(normal),
        "orientation": image(orient),
        "weights": per_ray["weights"],
        "t": per_ray["t"],
        "sample_normals": per_ray["sample_normals"],
        "orient_weights": per_ray["orient_weights"],
        "orient_normals": per_ray["orient_normals"],
        "ray_dirs": d[ray_index],
        "ray_index": ray_index,
        "batch_index": batch_index,
        "lights": lights,
    }


def _march(
    field,
    o,
    d,
    near,
    far,
    view_idx,
    n_samples,
    shading,
    lights,
    ambient,
    diffuse,
    perturb,
    generator,
    need_normals,
    normal_mode,
    threshold,
    occupancy=None,
) -> dict:
    n = o.shape[0]
    s = n_samples
    if perturb:
        u = torch.rand(n, s, generator=generator).to(o.device)
    else:
        u = o.new_full((n, s), 0.5)
    span = (far - near)[:, None]
    t = near[:, None] + span * (torch.arange(s, device=o.device, dtype=o.dtype)[None] + u) / s
    delta = span / s
    pts = (o[:, None, :] + t[..., None] * d[:, None, :]).reshape(-1, 3)
    if occupancy is None:
        density, albedo, raw = field.query(pts)
    else:
        keep = occupancy.query(pts).nonzero(as_tuple=True)[0]
        d_k, a_k, r_k = field.query(pts[keep])
        density = pts.new_zeros(n * s).index_copy(0, keep, d_k)
        albedo = pts.new_zeros(n * s, 3).index_copy(0, keep, a_k)
        raw = pts.new_zeros(n * s).index_copy(0, keep, r_k)
    sigma = density.view(n, s)
    alpha = 1.0 - torch.exp(-sigma * delta)
    trans = torch.cumprod(torch.cat([alpha.new_ones(n, 1), 1.0 - alpha[:, :-1] + 1e-10], 1), 1)
    weights = alpha * trans
    albedo = albedo.view(n, s, 3)
    opacity = weights.sum(1)
    albedo_ray = (weights[..., None] * albedo).sum(1)
    depth = (weights * t).sum(1)
    out = {"sample_normals": None, "orient_weights": None, "orient_normals": None, "normal": None, "orient": None}
    if not need_normals:
        rgb = albedo_ray
    elif normal_mode == "sample":
        sel = (weights.detach() > threshold).reshape(-1).nonzero(as_tuple=True)[0]
        normals = pts.new_zeros(n * s, 3)
        if sel.numel():
            normals = normals.index_copy(0, sel, field.normals(pts[sel], raw[sel]))
        normals = normals.view(n, s, 3)
        colour = shade(albedo, normals, lights[view_idx][:, None, :], shading, ambient, diffuse)
        rgb = (weights[..., None] * colour).sum(1)
        out.update(sample_normals=normals, orient_weights=weights, orient_normals=normals)
        out["normal"] = (weights[..., None] * normals).sum(1)
    elif normal_mode == "surface":
        surf_t = depth / opacity.clamp_min(1e-6)
        sel = (opacity.detach() > threshold).nonzero(as_tuple=True)[0]
        normals = o.new_zeros(n, 3)
        if sel.numel():
            p_surf = o[sel] + surf_t[sel, None] * d[sel]
            normals = normals.index_copy(0, sel, field.normals(p_surf))
        colour = shade(
            albedo_ray / opacity.clamp_min(1e-6)[:, None], normals, lights[view_idx], shading, ambient, diffuse
        )
        rgb = opacity[:, None] * colour
        out.update(orient_weights=opacity[:, None], orient_normals=normals[:, None, :])
        out["normal"] = opacity[:, None] * normals
    else:
        raise ValueError(f"unknown normal_mode {normal_mode!r}: use surface or sample")
    if need_normals:
        facing = (out["orient_normals"] * d[:, None, :]).sum(-1).clamp_min(0.0)
        out["orient"] = (out["orient_weights"].detach() * facing.square()).sum(1)
    out.update(rgb=rgb, albedo=albedo_ray, opacity=opacity, depth=depth, weights=weights, t=t)
    return out
