"""The toy world: coloured primitives with ground truth, rendered by sphere tracing in torch.

It is both the embedded prior's training set and the quality benchmark's ground truth. Every
object is centred at the origin and fits inside a radius of about 0.75 (the default camera at
radius 2.5 with a 40 degree fov sees about +-0.9 around the origin). Shading is Lambertian plus
ambient, with the light fixed relative to the camera (upper left, slightly in front), so an
object's colour stays recognizable from every view. Background is white.

World v2 adds two kinds of prompt where the methods differ (issue #16):
- objects with a front: "a red cube with a black spot" puts a dark disc on the side facing +x
  (azimuth 0, the "front view" camera). Only the view suffixes tell which side that is, so a
  result without them tends to grow the spot on several sides (the Janus problem);
- under-specified prompts with several modes: "a cube" (any colour), "a red object" (any shape).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

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

# The mark of objects with a front: surface facing +x (normal x > MARK_MIN_FACING) within
# MARK_RADIUS of the x axis. Dark and unsaturated, so it never reads as one of COLOURS.
MARK_WORDS = "with a black spot"
MARK_COLOUR = (0.06, 0.06, 0.06)
MARK_RADIUS = 0.22
MARK_MIN_FACING = 0.7
ANY_SHAPE_WORD = "object"  # "a red object": any shape

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


def marked_prompts() -> list[str]:
    """Objects with a front: "a red cube with a black spot", in toy_prompts() order."""
    return [f"{p} {MARK_WORDS}" for p in toy_prompts()]


def underspecified_prompts() -> list[str]:
    """Prompts with several modes: "a cube" (any colour) per shape, "a red object" (any shape) per colour."""
    return [f"a {s}" for s in SHAPES] + [f"a {c} {ANY_SHAPE_WORD}" for c in COLOURS]


@dataclass(frozen=True)
class ToyPrompt:
    """What a toy-world prompt asks for; None means "any" (an under-specified prompt)."""

    shape: str | None
    colour: str | None
    mark: bool = False
    view: str | None = None

    @property
    def modes(self) -> list[tuple[str, str]]:
        """Every (shape, colour) the prompt allows, shapes major."""
        shapes = [self.shape] if self.shape else list(SHAPES)
        colours = [self.colour] if self.colour else list(COLOURS)
        return [(s, c) for s in shapes for c in colours]

    @property
    def fully_specified(self) -> bool:
        return self.shape is not None and self.colour is not None

    def text(self, view: str | None = None) -> str:
        """The prompt in canonical form, e.g. "a red cube with a black spot, front view"."""
        words = ["a"] + ([self.colour] if self.colour else []) + [self.shape or ANY_SHAPE_WORD]
        if self.mark:
            words.append(MARK_WORDS)
        view = view if view is not None else self.view
        return " ".join(words) + (VIEW_SUFFIXES[view] if view else "")


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


def parse_toy_prompt(prompt: str) -> ToyPrompt:
    """A toy prompt's shape, colour (either may be "any"), mark and view; ValueError otherwise.

    "A red cube, front view" -> ToyPrompt("cube", "red", False, "front"); "a cube" -> any colour;
    "a red object with a black spot" -> any shape, marked.
    """
    base, view = split_view(prompt)
    mark = base.endswith(MARK_WORDS)
    if mark:
        base = base[: -len(MARK_WORDS)].strip()
    words = re.findall(r"[a-z]+", base)
    shapes = [w for w in words if w in SHAPES]
    colours = [w for w in words if w in COLOURS]
    any_shape = ANY_SHAPE_WORD in words
    unknown = [w for w in words if w not in SHAPES and w not in COLOURS and w not in (ANY_SHAPE_WORD, "a", "an", "the")]
    if (
        unknown
        or len(shapes) > 1
        or len(colours) > 1
        or (not shapes and not (any_shape and colours))
        or (shapes and any_shape)
    ):
        raise ValueError(
            f"not a toy-world prompt: {prompt!r} (want 'a <colour> <shape>', 'a <shape>' or 'a <colour> "
            f"{ANY_SHAPE_WORD}' with colour in {list(COLOURS)} and shape in {list(SHAPES)}, optionally "
            f"'{MARK_WORDS}' and ', front view' etc.)"
        )
    return ToyPrompt(shapes[0] if shapes else None, colours[0] if colours else None, mark, view)


def parse_prompt(prompt: str) -> tuple[str, str]:
    """Shape and colour named by a fully specified toy prompt, e.g. "A red cube, front view" -> ("cube", "red")."""
    toy = parse_toy_prompt(prompt)
    if not toy.fully_specified:
        raise ValueError(f"toy prompt {prompt!r} does not name both a colour and a shape (it has several modes)")
    return toy.shape, toy.colour


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
    mark=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render one primitive from each camera.

    Returns rgb [B,3,H,W] in [0,1] composited on white and mask [B,1,H,W] (soft when
    supersampled). `colour` is a COLOURS name or an RGB triple; `light` points towards the light
    in the camera frame (x right, y up, z towards the viewer). `mark` (an RGB triple, or True for
    MARK_COLOUR) paints the front spot of objects with a front.
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
    col = colour_tensor(colour, device)[None, :].expand(p.shape[0], 3)
    if mark is not None and mark is not False:
        spot = mark_region(p, n) & hit
        mark_rgb = colour_tensor(MARK_COLOUR if mark is True else mark, device)
        col = torch.where(spot[:, None], mark_rgb[None, :], col)
    mask = hit.float()
    rgb = shade[:, None] * col * mask[:, None] + (1 - mask[:, None])
    rgb = rgb.reshape(b, res, res, 3).permute(0, 3, 1, 2).contiguous()
    mask = mask.reshape(b, 1, res, res)
    if supersample > 1:
        rgb = F.avg_pool2d(rgb, supersample)
        mask = F.avg_pool2d(mask, supersample)
    return rgb.clamp(0, 1), mask


def mark_region(points: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """bool [...]: surface points [...,3] (with unit normals) inside the front spot."""
    near_axis = points[..., 1:].norm(dim=-1) < MARK_RADIUS
    return near_axis & (points[..., 0] > 0) & (normals[..., 0] > MARK_MIN_FACING)


def render_toy(toy: ToyPrompt, cameras: CameraBatch, size: int, shape: str | None = None, colour=None, **kw):
    """render_primitive for a parsed prompt; `shape`/`colour` pick a mode of an under-specified one."""
    shape = shape or toy.shape
    colour = colour or toy.colour
    if shape is None or colour is None:
        raise ValueError(f"{toy.text()!r} has several modes: pass the shape and colour to render")
    return render_primitive(shape, colour, cameras, size, mark=True if toy.mark else None, **kw)


def sphere_disc_fraction(radius: float, distance: float, fov_deg: float) -> float:
    """Analytic image fraction covered by a sphere seen from `distance` with a square `fov_deg` image."""
    half_angle = math.asin(radius / distance)
    r_img = math.tan(half_angle) / math.tan(math.radians(fov_deg) / 2)  # in half-image units
    return math.pi * r_img**2 / 4.0
