"""Geometry refinement on a signed-distance grid with differentiable marching tetrahedra
(Magic3D's fine stage uses DMTet the same way: surface from an SDF on a tetrahedral grid,
rendered by a rasterizer, the SDF optimized with score distillation).

Written here from the method's description:

- `tet_grid`: the density sampling grid cut into tetrahedra, six per cube along the cube's main
  diagonal (Freudenthal/Kuhn split), so neighbouring cubes agree on their face diagonals and
  the extracted surface is closed;
- `sdf_from_density`: the coarse field's occupancy (density above the extraction threshold)
  turned into a signed distance (negative inside) by Euclidean distance transforms, smoothed
  so the voxel staircase does not show up as normals;
- `marching_tets`: one surface vertex per tetrahedron edge whose ends have opposite signs, at
  the linear zero crossing (so gradients reach the SDF values), one triangle per tetrahedron
  with 1 or 3 inside corners, two with 2; each triangle faces away from the inside corners;
- `refine_geometry`: Adam on a smooth correction of the SDF (a coarse grid, trilinearly
  upsampled) against SDS on lambertian renders (colours from the field, fixed), with silhouette
  gradients from antialiasing, a Laplacian smoothness term and a pull towards the initial SDF.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "tet_grid",
    "sdf_from_density",
    "marching_tets",
    "laplacian_loss",
    "render_shaded",
    "GeometrySettings",
    "refine_geometry",
]


def tet_grid(resolution: int, lo, spacing, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Vertices [R^3,3] (index x*R*R + y*R + z, like `t3d.mesh.extract.sample_grid`) and tets [6(R-1)^3,4]."""
    r = int(resolution)
    if r < 2:
        raise ValueError("resolution must be >= 2")
    idx = torch.arange(r, device=device)
    gx, gy, gz = torch.meshgrid(idx, idx, idx, indexing="ij")
    lo_t = torch.as_tensor(np.asarray(lo, dtype=np.float32), device=device)
    sp_t = torch.as_tensor(np.broadcast_to(np.asarray(spacing, dtype=np.float32), (3,)).copy(), device=device)
    verts = torch.stack([gx, gy, gz], -1).reshape(-1, 3).float() * sp_t + lo_t
    c = torch.arange(r - 1, device=device)
    cx, cy, cz = torch.meshgrid(c, c, c, indexing="ij")
    base = (cx * r * r + cy * r + cz).reshape(-1)
    step = (r * r, r, 1)  # index offset of one step along x, y, z
    tets = []
    for a, b, _ in itertools.permutations(range(3)):
        tets.append(torch.stack([base, base + step[a], base + step[a] + step[b], base + sum(step)], -1))
    return verts, torch.cat(tets)


def sdf_from_density(sigma: np.ndarray, threshold: float, spacing, smooth_voxels: float = 1.0) -> np.ndarray:
    """Signed distance [R,R,R] in world units (negative where sigma > threshold), smoothed by a
    Gaussian of `smooth_voxels` voxels."""
    from scipy import ndimage

    inside = np.asarray(sigma) > threshold
    if not inside.any() or inside.all():
        raise ValueError("the occupancy grid is empty or full: nothing to refine")
    d_out = ndimage.distance_transform_edt(~inside)  # outside voxels: distance to the nearest inside one
    d_in = ndimage.distance_transform_edt(inside)
    sdf = np.where(inside, -(d_in - 0.5), d_out - 0.5).astype(np.float32)
    if smooth_voxels > 0:
        sdf = ndimage.gaussian_filter(sdf, smooth_voxels, mode="nearest")
    return sdf * float(np.mean(spacing))


# edge lists per case, as corner slots of the tet reordered inside-first (see marching_tets)
_ONE_INSIDE = ((0, 1), (0, 2), (0, 3))
_THREE_INSIDE = ((0, 3), (1, 3), (2, 3))
_TWO_INSIDE = (((0, 2), (0, 3), (1, 3)), ((0, 2), (1, 3), (1, 2)))


def marching_tets(verts: torch.Tensor, tets: torch.Tensor, sdf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Surface of sdf < 0: (vertices [M,3], faces [F,3] int64), outward-facing, watertight when the
    grid encloses the surface. Differentiable w.r.t. `sdf` (and `verts`)."""
    n = verts.shape[0]
    with torch.no_grad():
        occ = sdf < 0
        occ_t = occ[tets]
        n_in = occ_t.sum(1)
        keep = (n_in > 0) & (n_in < 4)
        tv, n_in = tets[keep], n_in[keep]
        order = torch.argsort((~occ_t[keep]).to(torch.int8), dim=1, stable=True)
        q = torch.gather(tv, 1, order)  # inside corners first
        tris, owner = [], []
        for count, cases in ((1, (_ONE_INSIDE,)), (3, (_THREE_INSIDE,)), (2, _TWO_INSIDE)):
            sel = (n_in == count).nonzero().squeeze(1)
            for edges in cases:
                ends = torch.stack([torch.stack([q[sel, i], q[sel, j]], -1) for i, j in edges], 1)  # [S,3,2]
                tris.append(ends)
                owner.append(sel)
        if not tris or sum(t.shape[0] for t in tris) == 0:
            return verts.new_zeros(0, 3), torch.zeros(0, 3, dtype=torch.long, device=verts.device)
        ends = torch.cat(tris)  # [F,3,2]
        owner = torch.cat(owner)
        a, b = ends.min(-1).values, ends.max(-1).values
        uniq, inv = torch.unique((a * n + b).reshape(-1), return_inverse=True)
        ea, eb = uniq // n, uniq % n
        faces = inv.reshape(-1, 3)
    s_a, s_b = sdf[ea], sdf[eb]
    w = (s_a / (s_a - s_b)).unsqueeze(-1)
    mverts = verts[ea] + w * (verts[eb] - verts[ea])
    with torch.no_grad():  # face away from the tet's inside corners
        p = mverts.detach()[faces]
        normal = torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=-1)
        corners = verts[q[owner]]  # [F,4,3]
        k = n_in[owner].unsqueeze(-1).float()
        slot = torch.arange(4, device=verts.device)[None, :]
        is_in = (slot < n_in[owner][:, None]).float().unsqueeze(-1)
        centre_in = (corners * is_in).sum(1) / k
        centre_out = (corners * (1 - is_in)).sum(1) / (4 - k)
        flip = (normal * (centre_out - centre_in)).sum(-1) < 0
        faces = torch.where(flip[:, None], faces[:, [0, 2, 1]], faces)
    return mverts, faces


def laplacian_loss(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each vertex from the average of its edge neighbours."""
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = torch.cat([e, e.flip(1)])
    nsum = torch.zeros_like(verts).index_add(0, e[:, 0], verts[e[:, 1]])
    deg = torch.zeros(verts.shape[0], device=verts.device, dtype=verts.dtype).index_add(
        0, e[:, 0], torch.ones_like(e[:, 0], dtype=verts.dtype)
    )
    lap = nsum / deg.clamp_min(1)[:, None] - verts
    return lap.square().sum(-1).mean()


def render_shaded(
    verts, faces, cameras, size: int, albedo_fn: Callable, ctx=None, ambient: float = 0.35
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lambertian render under the toy world's camera-fixed light, on white, antialiased so the
    silhouette moves with the vertices: (rgb [B,3,H,W], coverage [B,1,H,W]), row 0 at the top."""
    from t3d.render.raster import antialias, interpolate, mvp_matrices, rasterize, vertex_normals
    from t3d.render.volume import light_directions

    faces_i = faces.to(torch.int32)
    mvp = mvp_matrices(cameras.to(verts.device)).to(verts.dtype)
    pos = torch.einsum("bij,vj->bvi", mvp, torch.cat([verts, torch.ones_like(verts[:, :1])], -1)).contiguous()
    rast, _ = rasterize(ctx, pos, faces_i, (size, size))
    attrs = torch.cat([verts, vertex_normals(verts, faces_i)], -1)[None].expand(pos.shape[0], -1, -1).contiguous()
    packed, _ = interpolate(attrs, rast, faces_i, ctx=ctx)
    xyz, nrm = packed[..., :3], packed[..., 3:]
    nrm = nrm / nrm.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    mask = rast[..., 3] > 0
    albedo = torch.ones_like(xyz)
    if mask.any():
        with torch.no_grad():
            colours = albedo_fn(xyz[mask].detach()).to(xyz.dtype)
        albedo = albedo.masked_scatter(mask[..., None].expand_as(albedo), colours.reshape(-1))
    light = light_directions(cameras).to(verts.device, verts.dtype)
    lam = (nrm * light[:, None, None, :]).sum(-1, keepdim=True).clamp_min(0)
    cov = mask[..., None].to(verts.dtype)
    color = (albedo * (ambient + (1 - ambient) * lam)) * cov + (1 - cov)
    color = antialias(torch.cat([color, cov], -1).contiguous(), rast, pos, faces_i, ctx=ctx)
    color = torch.flip(color, dims=[1]).permute(0, 3, 1, 2)
    return color[:, :3].clamp(0, 1), color[:, 3:]


@dataclass
class GeometrySettings:
    steps: int = 200
    resolution: int = 64
    render_size: int = 64
    batch_size: int = 2
    lr: float = 2e-3
    guidance_scale: float = 7.5
    t_range: tuple[float, float] = (0.02, 0.5)
    laplacian_weight: float = 0.5
    anchor_weight: float = 10.0
    band_voxels: float = 4.0
    correction_resolution: int = 16
    ambient: float = 0.35


def refine_geometry(
    sigma: np.ndarray,
    lo,
    spacing,
    threshold: float,
    albedo_fn: Callable,
    prior,
    embeddings,
    camera_params,
    settings: GeometrySettings,
    generator: torch.Generator,
    raster_ctx=None,
    device="cpu",
    progress=None,
    resume: tuple[int, dict, dict] | None = None,
    on_step: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """SDS on the SDF grid made from `sigma`; returns the final surface (vertices, faces) and the
    loss history. `resume` is a checkpoint (step, tensors, meta) written from `on_step(step,
    tensors, meta)`, which is called after every step."""
    from t3d.guidance.sds import guidance_loss
    from t3d.render.cameras import sample_cameras, view_names
    from t3d.stage import flatten_optimizer, restore_optimizer

    res = sigma.shape[0]
    verts, tets = tet_grid(res, lo, spacing, device)
    sdf0 = torch.as_tensor(sdf_from_density(sigma, threshold, spacing), device=device).reshape(-1)
    voxel = float(np.mean(spacing))
    band = sdf0.abs() < settings.band_voxels * voxel
    tets = tets[band[tets].all(1)]  # only tets near the surface can hold it during refinement
    # The SDF moves by a smooth correction: a coarse grid, trilinearly upsampled. Per-vertex
    # freedom let SDS noise roughen the surface (a 32-px prior cannot ask for finer detail).
    r = max(2, min(res, int(settings.correction_resolution)))
    delta = torch.nn.Parameter(torch.zeros(1, 1, r, r, r, device=device))
    opt = torch.optim.Adam([delta], lr=settings.lr)

    def current_sdf() -> torch.Tensor:
        up = torch.nn.functional.interpolate(delta, size=(res, res, res), mode="trilinear", align_corners=True)
        return sdf0 + up.reshape(-1)

    step, history = 0, []
    if resume is not None:
        step, tensors, meta = resume
        delta.data.copy_(tensors["delta"].to(device))
        restore_optimizer(opt, tensors, meta["opt"])
        generator.set_state(tensors["rng"])
        history = list(meta["history"])
    while step < settings.steps:
        sdf = current_sdf()
        mverts, faces = marching_tets(verts, tets, sdf)
        if faces.shape[0] == 0:
            raise FloatingPointError(f"geometry refinement lost the surface at step {step}; lower geometry_lr")
        cams = sample_cameras(camera_params, settings.batch_size, generator).to(device)
        rgb, _ = render_shaded(mverts, faces, cams, settings.render_size, albedo_fn, raster_ctx, settings.ambient)
        cond, uncond = (
            embeddings.for_views(view_names(cams, camera_params)),
            embeddings.uncond_batch(settings.batch_size),
        )
        l_sds, info = guidance_loss(
            "sds",
            prior,
            rgb.to(prior.dtype),
            cond,
            uncond,
            guidance_scale=settings.guidance_scale,
            t_range=settings.t_range,
            generator=generator,
        )
        l_lap = laplacian_loss(mverts, faces) / voxel**2  # in voxels^2: the same weight at any resolution
        l_anchor = (sdf - sdf0)[band].square().mean() / voxel**2
        loss = l_sds + settings.laplacian_weight * l_lap + settings.anchor_weight * l_anchor
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec = {
            "step": step,
            "loss": float(l_sds.detach()),
            "laplacian": float(l_lap.detach()),
            "anchor": float(l_anchor.detach()),
            "faces": int(faces.shape[0]),
        }
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"geometry refinement: loss is {rec['loss']} at step {step}; lower geometry_lr")
        history.append(rec)
        step += 1
        if progress is not None:
            progress(1, loss=rec["loss"])
        if on_step is not None:
            opt_t, opt_meta = flatten_optimizer(opt)
            on_step(
                step,
                {"delta": delta.detach(), "rng": generator.get_state(), **opt_t},
                {"opt": opt_meta, "history": history},
            )
    with torch.no_grad():
        mverts, faces = marching_tets(verts, tets, current_sdf())
    return mverts.detach(), faces, history
