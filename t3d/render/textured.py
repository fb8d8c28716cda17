"""A textured mesh lit the way the toy world and the texture stage light things, on white.

Shared by the toy metrics (scoring an exported mesh against the true primitive) and best-of-N
(showing a finished mesh to the prior): one place for the PNG-to-GL texture flip, the
camera-fixed lambertian light and the white background.
"""

from __future__ import annotations

import numpy as np
import torch

from t3d.render.raster import RasterBackend, render_mesh
from t3d.render.shading import composite_on_white, shade
from t3d.render.volume import light_directions


@torch.no_grad()
def render_lit_textured(
    verts: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray,
    texture: np.ndarray,
    cameras,
    size: int,
    *,
    raster: RasterBackend,
    ambient: float,
    diffuse: float | None = None,
    antialias: bool = True,
    device="cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """rgb [B,3,H,W] in [0,1] on white and mask [B,1,H,W]. `texture` is the PNG's uint8 [H,W,C]
    (row 0 at the top); with `antialias` the edges blend into the white background."""
    device = torch.device(device)
    cams = cameras.to(device)
    tex = torch.as_tensor(np.ascontiguousarray(texture[::-1, :, :3]), device=device).float() / 255.0  # GL rows
    out = render_mesh(
        torch.as_tensor(verts, device=device),
        torch.as_tensor(faces, device=device),
        cams,
        size,
        raster=raster,
        uvs=torch.as_tensor(uvs, device=device),
        tex=tex,
        background=1.0 if antialias else None,
        antialias_rgb=antialias,
    )
    light = light_directions(cams)[:, None, None, :]
    shaded = shade(out["rgb"][..., :3], out["normal"], light, "lambertian", ambient, diffuse)
    rgb = composite_on_white(shaded, out["mask"])
    return rgb.permute(0, 3, 1, 2).clamp(0, 1), out["mask"].permute(0, 3, 1, 2)
