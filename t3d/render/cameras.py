"""Cameras shared by the toy world, the prior's training set and every optimization stage.

One distribution everywhere matters: the prior only knows the views it was trained on, so the
NeRF stages sample cameras from exactly the same ranges (azimuth, elevation, radius, fov).

Conventions: world is right-handed with +z up; the object sits at the origin. A camera at
azimuth `az`, elevation `el` sits at r * (cos el cos az, cos el sin az, sin el) and looks at the
origin. Camera frame is OpenGL's (looks down -z, +y up). Images are row 0 at the top.
Azimuth 0 is the object's front (+x); 180 its back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

VIEW_SUFFIXES = {
    "front": ", front view",
    "side": ", side view",
    "back": ", back view",
    "overhead": ", overhead view",
}


def view_prompt(prompt: str, view: str) -> str:
    """DreamFusion's view-dependent prompt: the prompt with the view's suffix."""
    return prompt.rstrip(" .") + VIEW_SUFFIXES[view]


class CameraParams(BaseModel):
    """The camera distribution: the prior is trained on it and the stages sample from it."""

    model_config = ConfigDict(extra="forbid")

    azimuth_range: tuple[float, float] = (0.0, 360.0)
    elevation_range: tuple[float, float] = (-10.0, 60.0)
    radius: float = Field(2.5, gt=0)
    fov_deg: float = Field(40.0, gt=0, lt=180)
    front_half_angle: float = Field(45.0, ge=0, le=90, description="|az| below this is the front view")
    overhead_threshold: float = Field(
        45.0, description="elevation above this is the overhead view (DreamFusion uses 60 with el up to 90)"
    )


@dataclass
class CameraBatch:
    """A batch of cameras: angles in degrees, camera-to-world matrices [B,4,4]."""

    azimuth: torch.Tensor
    elevation: torch.Tensor
    radius: torch.Tensor
    fov_deg: float
    c2w: torch.Tensor

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def to(self, device) -> CameraBatch:
        return CameraBatch(
            self.azimuth.to(device),
            self.elevation.to(device),
            self.radius.to(device),
            self.fov_deg,
            self.c2w.to(device),
        )


def look_at_origin(azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Camera-to-world matrices [B,4,4] for cameras on a sphere looking at the origin, z up."""
    az = torch.deg2rad(azimuth_deg.double())
    el = torch.deg2rad(elevation_deg.double())
    r = radius.double()
    eye = torch.stack([r * el.cos() * az.cos(), r * el.cos() * az.sin(), r * el.sin()], -1)
    forward = -eye / eye.norm(dim=-1, keepdim=True)
    up_world = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(forward)
    right = torch.linalg.cross(forward, up_world, dim=-1)
    # Straight overhead the cross product vanishes; fall back to +y as the world "up" there.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-8
    right = torch.where(
        degenerate,
        torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand_as(forward), dim=-1),
        right,
    )
    right = right / right.norm(dim=-1, keepdim=True)
    up = torch.linalg.cross(right, forward, dim=-1)
    c2w = torch.zeros(eye.shape[0], 4, 4, dtype=torch.float64)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = eye
    c2w[:, 3, 3] = 1.0
    return c2w.float()


def make_cameras(azimuth_deg, elevation_deg, radius: float, fov_deg: float) -> CameraBatch:
    az = torch.as_tensor(azimuth_deg, dtype=torch.float32).reshape(-1)
    el = torch.as_tensor(elevation_deg, dtype=torch.float32).reshape(-1)
    r = torch.full_like(az, float(radius))
    return CameraBatch(az, el, r, float(fov_deg), look_at_origin(az, el, r))


def sample_cameras(params: CameraParams, n: int, generator: torch.Generator | None = None) -> CameraBatch:
    """Random cameras: azimuth uniform, elevation uniform in degrees (as the prior was trained)."""
    u = torch.rand(n, 2, generator=generator)
    a0, a1 = params.azimuth_range
    e0, e1 = params.elevation_range
    return make_cameras(a0 + u[:, 0] * (a1 - a0), e0 + u[:, 1] * (e1 - e0), params.radius, params.fov_deg)


def orbit_cameras(params: CameraParams, n: int, elevation_deg: float = 15.0, start_deg: float = 0.0) -> CameraBatch:
    """Evenly spaced cameras around the object: turntables and held-out evaluation views."""
    az = start_deg + torch.arange(n, dtype=torch.float32) * (360.0 / n)
    return make_cameras(az, torch.full((n,), float(elevation_deg)), params.radius, params.fov_deg)


def view_name(azimuth_deg: float, elevation_deg: float, params: CameraParams | None = None) -> str:
    """DreamFusion's view-dependent prompt direction for one camera."""
    p = params or CameraParams()
    if elevation_deg > p.overhead_threshold:
        return "overhead"
    az = (float(azimuth_deg) + 180.0) % 360.0 - 180.0  # to [-180, 180)
    if abs(az) < p.front_half_angle:
        return "front"
    if abs(az) > 180.0 - p.front_half_angle:
        return "back"
    return "side"


def view_names(cameras: CameraBatch, params: CameraParams | None = None) -> list[str]:
    return [view_name(a, e, params) for a, e in zip(cameras.azimuth.tolist(), cameras.elevation.tolist())]


def camera_rays(cameras: CameraBatch, height: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space ray origins and unit directions, each [B, H, W, 3], through pixel centres."""
    width = width or height
    device = cameras.c2w.device
    focal = 0.5 * height / math.tan(math.radians(cameras.fov_deg) / 2)
    j, i = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32) + 0.5,
        torch.arange(width, device=device, dtype=torch.float32) + 0.5,
        indexing="ij",
    )
    dirs_cam = torch.stack([(i - width / 2) / focal, -(j - height / 2) / focal, -torch.ones_like(i)], -1)
    rot = cameras.c2w[:, :3, :3]
    dirs = torch.einsum("bij,hwj->bhwi", rot, dirs_cam)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origins = cameras.c2w[:, None, None, :3, 3].expand_as(dirs)
    return origins, dirs


def projection_matrix(fov_deg: float, near: float = 0.1, far: float = 10.0, aspect: float = 1.0) -> torch.Tensor:
    """OpenGL perspective projection [4,4] (clip space), for the rasterizer."""
    f = 1.0 / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor(
        [
            [f / aspect, 0, 0, 0],
            [0, f, 0, 0],
            [0, 0, (far + near) / (near - far), 2 * far * near / (near - far)],
            [0, 0, -1, 0],
        ],
        dtype=torch.float32,
    )
