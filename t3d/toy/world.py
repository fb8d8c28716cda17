"""The toy world: coloured primitives with ground truth, rendered by sphere tracing in torch.

It is both the embedded prior's training set and the quality benchmark's ground truth. Every
object is centred at the origin and fits inside a radius of about 0.75 (the default camera at
radius 2.5 with a 40 degree fov sees about +-0.9 around the origin). Shading is Lambertian plus
ambient, with the light fixed relative to the camera (upper left, slightly in front), so an
object's colour stays recognizable from every view. Background is white.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from t3d.render.cameras import VIEW_SUFFIXES, CameraBatch, camera_rays
from t3d.render.shading import LIGHT_CAM

SHAPES: tuple[str, ...] = ("cube", "sphere", "cone", "cylinder", "torus")

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.10),
    "green": (0.12, 0.70, 0.18),
    "blue": (0.12, 0.28, 0.90),
    "yellow": (0.95, 0.82, 0.10),
}

# Light direction (towards the light) in the camera frame: x right, y up, +z towards the viewer.
DEFAULT_LIGHT = LIGHT_CAM  # t3d.render.shading's, the one light every renderer uses
AMBIENT = 0.35
DIFFUSE = 0.65

BOUND_RADIUS = 0.8  # every shape fits inside this sphere

# Shape dimensions (kept here so the benchmark and docs can quote them).
CUBE_HALF = 0.42
SPHERE_RADIUS = 0.62
CONE_RADIUS, CONE_HEIGHT = 0.52, 1.1
CYLINDER_RADIUS, CYLINDER_HALF_HEIGHT = 0.34, 0.6
TORUS_MAJOR, TORUS_MINOR = 0.5, 0.2


def toy_prompts() -> list[str]:
    """Base prompts ("a red cube"), shapes major, colours minor."""
    return [f"a {c} {s}" for s in SHAPES for c in COLOURS]


def toy_prompts_with_views() -> list[str]:
    """Every base prompt with each of DreamFusion's view suffixes."""
    return [p + suffix for p in toy_prompts() for suffix in VIEW_SUFFIXES.values()]


_VIEW_RE = re.compile(r",?\s*(front|side|back|overhead)\s+view\s*$")


def split_view(prompt: str) -> tuple[str, str | None]:
    """("a red cube, side view") -> ("a red cube", "side"); no suffix gives None."""
    p = prompt.strip().lower()
    m = _VIEW_RE.search(p)
    if not m:
        return p, None
    return p[: m.start()].strip(), m.group(1)


def parse_prompt(prompt: str) -> tuple[str, str]:
    """Shape and colour named by a toy prompt, e.g. "A red cube, front view" -> ("cube", "red")."""
    base, _ = split_view(prompt)
    words = re.findall(r"[a-z]+", base)
    shapes = [w for w in words if w in SHAPES]
    colours = [w for w in words if w in COLOURS]
    if len(shapes) != 1 or len(colours) != 1:
        raise ValueError(
            f"not a toy-world prompt: {prompt!r} (want 'a <colour> <shape>' with colour in "
            f"{list(COLOURS)} and shape in {list(SHAPES)}, optionally ', front view' etc.)"
        )
    return shapes[0], colours[0]


# ---- signed distance functions ---------------------------------------------------------------


def _sdf_box(p: torch.Tensor, half: float) -> torch.Tensor:
    q = p.abs() - half
    return q.clamp_min(0).norm(dim=-1) + q.max(dim=-1).values.clamp_max(0)


def _sdf_sphere(p: torch.Tensor, radius: float) -> torch.Tensor:
    return p.norm(dim=-1) - radius


def _sdf_cylinder(p: torch.Tensor, radius: float, half_height: float) -> torch.Tensor:
    r = p[..., :2].norm(dim=-1)
    d = torch.stack([r - radius, p[..., 2].abs() - half_height], -1)
    return d.clamp_min(0).norm(dim=-1) + d.max(dim=-1).values.clamp_max(0)


def _seg_dist(px, py, ax, ay, bx, by):
    """Distance from 2D points to the segment a-b."""
    dx, dy = bx - ax, by - ay
    h = (((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy)).clamp(0, 1)
    return torch.sqrt((px - ax - h * dx) ** 2 + (py - ay - h * dy) ** 2)


def _sdf_cone(p: torch.Tensor, radius: float, height: float) -> torch.Tensor:
    """Solid cone, apex up at z=+h/2, base disc at z=-h/2: exact distance to the revolved triangle."""
    r = p[..., :2].norm(dim=-1)
    z = p[..., 2]
    top, bottom = height / 2, -height / 2
    d_side = _seg_dist(r, z, 0.0, top, radius, bottom)
    d_base = _seg_dist(r, z, 0.0, bottom, radius, bottom)
    d = torch.minimum(d_side, d_base)
    inside = (z > bottom) & (r < radius * (top - z) / height)
    return torch.where(inside, -d, d)


def _sdf_torus(p: torch.Tensor, major: float, minor: float) -> torch.Tensor:
    r = p[..., :2].norm(dim=-1)
    return torch.sqrt((r - major) ** 2 + p[..., 2] ** 2) - minor


def sdf(shape: str, points: torch.Tensor) -> torch.Tensor:
    """Signed distance [...] of points [..., 3] to a toy shape (negative inside)."""
    if shape == "cube":
        return _sdf_box(points, CUBE_HALF)
    if shape == "sphere":
        return _sdf_sphere(points, SPHERE_RADIUS)
    if shape == "cone":
        return _sdf_cone(points, CONE_RADIUS, CONE_HEIGHT)
    if shape == "cylinder":
        return _sdf_cylinder(points, CYLINDER_RADIUS, CYLINDER_HALF_HEIGHT)
    if shape == "torus":
        return _sdf_torus(points, TORUS_MAJOR, TORUS_MINOR)
    raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")


def _normals(shape: str, p: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    offsets = torch.eye(3, device=p.device, dtype=p.dtype) * eps
    grad = torch.stack([sdf(shape, p + o) - sdf(shape, p - o) for o in offsets], -1)
    return F.normalize(grad, dim=-1)


# ---- rendering -------------------------------------------------------------------------------


def colour_tensor(colour, device=None) -> torch.Tensor:
    rgb = COLOURS[colour] if isinstance(colour, str) else colour
    return torch.as_tensor(rgb, dtype=torch.float32, device=device).reshape(3)


@torch.no_grad()
def render_primitive(
    shape: str,
    colour,
    cameras: CameraBatch,
    size: int,
    light=DEFAULT_LIGHT,
    supersample: int = 1,
    max_steps: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render one primitive from each camera.

    Returns rgb [B,3,H,W] in [0,1] composited on white and mask [B,1,H,W] (soft when
    supersampled). `colour` is a COLOURS name or an RGB triple; `light` points towards the light
    in the camera frame (x right, y up, z towards the viewer).
    """
    device = cameras.c2w.device
    res = size * supersample
    origins, dirs = camera_rays(cameras, res)
    b = origins.shape[0]
    o = origins.reshape(-1, 3)
    d = dirs.reshape(-1, 3)
    # Start marching where the ray enters the bounding sphere.
    od = (o * d).sum(-1)
    disc = od**2 - ((o * o).sum(-1) - BOUND_RADIUS**2)
    may_hit = disc > 0
    t = (-od - disc.clamp_min(0).sqrt()).clamp_min(0)
    t_far = -od + disc.clamp_min(0).sqrt()
    hit = torch.zeros_like(may_hit)
    active = may_hit.clone()
    for _ in range(max_steps):
        idx = active.nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            break
        dist = sdf(shape, o[idx] + t[idx, None] * d[idx])
        t[idx] = t[idx] + dist
        done = dist < 1e-4
        hit[idx[done]] = True
        gone = t[idx] > t_far[idx]
        active[idx[done | gone]] = False
    p = o + t[:, None] * d
    n = torch.zeros_like(p)
    hidx = hit.nonzero(as_tuple=True)[0]
    if hidx.numel():
        n[hidx] = _normals(shape, p[hidx])
    # Light fixed in the camera frame -> world, per camera.
    l_cam = F.normalize(torch.as_tensor(light, dtype=torch.float32, device=device), dim=0)
    l_world = torch.einsum("bij,j->bi", cameras.c2w[:, :3, :3].float(), l_cam)  # [B,3]
    l_pix = l_world[:, None, :].expand(b, res * res, 3).reshape(-1, 3)
    shade = AMBIENT + DIFFUSE * (n * l_pix).sum(-1).clamp_min(0)
    col = colour_tensor(colour, device)
    mask = hit.float()
    rgb = shade[:, None] * col[None, :] * mask[:, None] + (1 - mask[:, None])
    rgb = rgb.reshape(b, res, res, 3).permute(0, 3, 1, 2).contiguous()
    mask = mask.reshape(b, 1, res, res)
    if supersample > 1:
        rgb = F.avg_pool2d(rgb, supersample)
        mask = F.avg_pool2d(mask, supersample)
    return rgb.clamp(0, 1), mask


def sphere_disc_fraction(radius: float, distance: float, fov_deg: float) -> float:
    """Analytic image fraction covered by a sphere seen from `distance` with a square `fov_deg` image."""
    half_angle = math.asin(radius / distance)
    r_img = math.tan(half_angle) / math.tan(math.radians(fov_deg) / 2)  # in half-image units
    return math.pi * r_img**2 / 4.0
