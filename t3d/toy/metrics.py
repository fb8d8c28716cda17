"""Quality in the toy world, where ground truth exists: silhouette IoU and foreground colour error
against the true primitive, from held-out orbit views (between the training azimuths' grid).

Used by the stages' metrics and by bench/quality.py, for NeRF renders and textured meshes alike.
"""

from __future__ import annotations

import numpy as np
import torch

from t3d.render.cameras import CameraParams, orbit_cameras
from t3d.render.raster import RasterBackend
from t3d.render.shading import composite_on_white, shade
from t3d.render.volume import light_directions
from t3d.toy import world as toyworld


def eval_cameras(camera: CameraParams, n_views: int = 8):
    return orbit_cameras(camera, n_views, elevation_deg=15.0, start_deg=360.0 / n_views / 2)


def score(pred_rgb: torch.Tensor, pred_mask: torch.Tensor, true_rgb: torch.Tensor, true_mask: torch.Tensor) -> dict:
    """IoU of (mask > 0.5) and mean |rgb difference| over pixels both call foreground ([B,C,H,W])."""
    pred = pred_mask[:, 0] > 0.5
    true = true_mask[:, 0] > 0.5
    iou = ((pred & true).sum() / (pred | true).sum().clamp_min(1)).item()
    both = pred & true
    err = (pred_rgb - true_rgb).abs().mean(1)[both]
    return {"iou": round(iou, 4), "color_err": round(err.mean().item(), 4) if err.numel() else 1.0}


@torch.no_grad()
def evaluate_field(field, prompt: str, camera: CameraParams, n_views: int = 8, size: int = 32) -> dict:
    """A radiance field, volume-rendered lambertian under the toy world's light. {} if not a toy prompt."""
    from t3d.render.volume import render

    try:
        shape, colour = toyworld.parse_prompt(prompt)
    except ValueError:
        return {}
    cams = eval_cameras(camera, n_views)
    out = render(
        field,
        cams,
        size,
        n_samples=64,
        shading="lambertian",
        light_dir=toyworld.DEFAULT_LIGHT,
        ambient=toyworld.AMBIENT,
        diffuse=toyworld.DIFFUSE,
        background="white",
    )
    true_rgb, true_mask = toyworld.render_primitive(shape, colour, cams.to(field.device), size)
    return score(out["rgb"], out["opacity"], true_rgb, true_mask)


@torch.no_grad()
def render_textured_mesh(
    tmesh, cams, size: int, raster: RasterBackend, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A TexturedMesh lit like the toy world (camera-fixed light): rgb [B,3,H,W] on white, mask [B,1,H,W]."""
    from t3d.render.raster import render_mesh

    cams = cams.to(device)
    tex = torch.as_tensor(np.array(tmesh.texture), device=device)  # copy: read-only PNG buffers
    tex = tex.float().div(255).flip(0)  # PNG rows -> GL rows (row 0 = v 0)
    out = render_mesh(
        torch.as_tensor(tmesh.verts, device=device),
        torch.as_tensor(tmesh.faces, device=device),
        cams,
        size,
        raster=raster,
        uvs=torch.as_tensor(tmesh.uvs, device=device),
        tex=tex[..., :3],
        background=1.0,
    )
    light = light_directions(cams)[:, None, None, :]
    shaded = shade(out["rgb"][..., :3], out["normal"], light, "lambertian", toyworld.AMBIENT, toyworld.DIFFUSE)
    rgb = composite_on_white(shaded, out["mask"])
    return rgb.permute(0, 3, 1, 2).clamp(0, 1), out["mask"].permute(0, 3, 1, 2)


def evaluate_mesh(
    tmesh,
    prompt: str,
    camera: CameraParams,
    n_views: int = 8,
    size: int = 32,
    *,
    raster: RasterBackend,
    device="cpu",
) -> dict:
    """IoU and colour error as `score`, plus the 3D metrics against the true primitive
    (t3d.toy.shape_metrics: chamfer, normal consistency, edge sharpness for cubes). {} for prompts
    outside the toy world."""
    from t3d.toy.shape_metrics import mesh_shape_metrics

    try:
        shape, colour = toyworld.parse_prompt(prompt)
    except ValueError:
        return {}
    cams = eval_cameras(camera, n_views)
    rgb, mask = render_textured_mesh(tmesh, cams, size, raster, device)
    true_rgb, true_mask = toyworld.render_primitive(shape, colour, cams.to(device), size)
    return {**score(rgb, mask, true_rgb, true_mask), **mesh_shape_metrics(tmesh.verts, tmesh.faces, shape)}
