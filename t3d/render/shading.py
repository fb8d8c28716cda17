"""Lambertian shading on white, the one definition: the volume renderer, the mesh renders of
geometry refinement and texture, and the toy metrics all light an object the way the toy world
does (a light fixed in each camera's frame, ambient + diffuse * max(0, n.l)).
"""

from __future__ import annotations

from typing import Literal

import torch

# Towards the light, camera frame (x right, y up, +z towards the viewer): the toy world's light.
LIGHT_CAM = (-0.45, 0.55, 0.70)

Shading = Literal["albedo", "lambertian", "textureless"]


def shade(
    albedo: torch.Tensor,
    normals: torch.Tensor,
    light: torch.Tensor,
    mode: Shading = "lambertian",
    ambient: float = 0.35,
    diffuse: float | None = None,
) -> torch.Tensor:
    """Colour [..., 3] of `albedo` under unit `light` directions (broadcast against `normals`).
    "albedo" returns it unlit; "textureless" shades white; `diffuse` defaults to 1 - ambient."""
    if mode == "albedo":
        return albedo
    diffuse = 1.0 - ambient if diffuse is None else diffuse
    lam = (normals * light).sum(-1, keepdim=True).clamp_min(0.0)
    brightness = ambient + diffuse * lam
    if mode == "textureless":
        return brightness.expand_as(albedo)
    return albedo * brightness


def composite_on_white(rgb: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """rgb where covered, white elsewhere (coverage in [0,1], broadcast against rgb)."""
    return rgb * coverage + (1 - coverage)
