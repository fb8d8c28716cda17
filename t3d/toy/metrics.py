"""Quality in the toy world, where ground truth exists: silhouette IoU and foreground colour error
against the true primitive, from held-out orbit views (between the training azimuths' grid).

Used by the stages' metrics and by bench/quality.py, for NeRF renders and textured meshes alike.
"""

from __future__ import annotations

import torch

from t3d.render.cameras import CameraParams, make_cameras, orbit_cameras
from t3d.render.raster import RasterBackend
from t3d.render.textured import render_lit_textured
from t3d.toy import world as toyworld

# The front spot's readout (world v2). A pixel is "mark" when it is off the white background and
# every channel is below MARK_MAX_CHANNEL: the spot's shaded colour is <= 0.06, while the darkest
# shaded toy colour has a channel >= 0.245 (green in shadow). The spot is "visible" when mark
# pixels cover >= MARK_VISIBLE_FRACTION of the image: over the prior's camera distribution a true
# front view shows >= 0.016 (torus) and from the four canonical views (elevation 15) the limb
# slivers of the side views cover <= 0.006, the back view 0.
MARK_MAX_CHANNEL = 0.15
MARK_VISIBLE_FRACTION = 0.012
CANONICAL_AZIMUTHS = {"front": 0.0, "left": 90.0, "back": 180.0, "right": 270.0}


def mark_fraction(rgb: torch.Tensor) -> torch.Tensor:
    """[B]: the fraction of each image [B,3,H,W] (in [0,1], on white) that shows the dark spot."""
    foreground = (1.0 - rgb).amax(dim=1) > 0.25
    return (foreground & (rgb.amax(dim=1) < MARK_MAX_CHANNEL)).float().mean(dim=(1, 2))


def mark_visible(rgb: torch.Tensor) -> torch.Tensor:
    """bool [B]: does each image show the front spot?"""
    return mark_fraction(rgb) >= MARK_VISIBLE_FRACTION


def canonical_cameras(camera: CameraParams, elevation_deg: float = 15.0):
    """Front, left, back and right views (azimuth 0, 90, 180, 270), in CANONICAL_AZIMUTHS' order."""
    az = list(CANONICAL_AZIMUTHS.values())
    return make_cameras(az, [elevation_deg] * len(az), camera.radius, camera.fov_deg)


def janus_readout(rgb4: torch.Tensor) -> dict:
    """Renders of the four canonical views -> where the spot shows, and whether that is Janus:
    the spot on more than one side, or not at the front."""
    visible = mark_visible(rgb4).tolist()
    sides = [name for name, v in zip(CANONICAL_AZIMUTHS, visible) if v]
    return {
        "mark_sides": sides,
        "mark_fraction": [round(float(f), 4) for f in mark_fraction(rgb4)],
        "janus": len(sides) > 1 or "front" not in sides,
    }


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


def score_against_truth(rgb, mask, toy: toyworld.ToyPrompt, cams, size: int) -> dict:
    """score() against the true object (with its spot when the prompt asks for one). An
    under-specified prompt is scored against its nearest mode (highest IoU - colour error), named
    in "mode", so "a cube" that came out blue is right."""
    best = None
    for shape, colour in toy.modes:
        true_rgb, true_mask = toyworld.render_toy(toy, cams, size, shape=shape, colour=colour)
        result = score(rgb, mask, true_rgb, true_mask)
        if best is None or result["iou"] - result["color_err"] > best["iou"] - best["color_err"]:
            best = result if toy.fully_specified else {**result, "mode": f"{colour} {shape}"}
    return best


@torch.no_grad()
def render_field_lit(field, cams, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A radiance field volume-rendered lambertian under the toy world's light: rgb [B,3,H,W], opacity [B,1,H,W]."""
    from t3d.render.volume import render

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
    return out["rgb"], out["opacity"]


@torch.no_grad()
def evaluate_field(field, prompt: str, camera: CameraParams, n_views: int = 8, size: int = 32) -> dict:
    """A radiance field against the truth from held-out orbit views. {} if not a toy prompt."""
    try:
        toy = toyworld.parse_toy_prompt(prompt)
    except ValueError:
        return {}
    cams = eval_cameras(camera, n_views)
    rgb, opacity = render_field_lit(field, cams, size)
    return score_against_truth(rgb, opacity, toy, cams.to(field.device), size)


def foreground_saturation(rgb: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean HSV saturation over pixels with mask > 0.5 ([B,3,H,W], [B,1,H,W]); the spot (dark,
    unsaturated) is left out so it does not read as lost colour."""
    px = rgb.permute(0, 2, 3, 1)[(mask[:, 0] > 0.5) & (rgb.amax(dim=1) >= MARK_MAX_CHANNEL)]
    if px.shape[0] == 0:
        return 0.0
    mx, mn = px.max(dim=-1).values, px.min(dim=-1).values
    return float(((mx - mn) / mx.clamp_min(1e-6)).mean())


@torch.no_grad()
def render_textured_mesh(
    tmesh, cams, size: int, raster: RasterBackend, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A TexturedMesh lit like the toy world (camera-fixed light): rgb [B,3,H,W] on white, mask [B,1,H,W]."""
    return render_lit_textured(
        tmesh.verts,
        tmesh.faces,
        tmesh.uvs,
        tmesh.texture,
        cams,
        size,
        raster=raster,
        ambient=toyworld.AMBIENT,
        diffuse=toyworld.DIFFUSE,
        device=device,
    )


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
        toy = toyworld.parse_toy_prompt(prompt)
    except ValueError:
        return {}
    cams = eval_cameras(camera, n_views)
    rgb, mask = render_textured_mesh(tmesh, cams, size, raster, device)
    result = score_against_truth(rgb, mask, toy, cams.to(device), size)
    shape = toy.shape or result["mode"].split()[-1]  # an under-specified prompt: its nearest mode's shape
    return {**result, **mesh_shape_metrics(tmesh.verts, tmesh.faces, shape)}
