"""Previews of a stage's result: a turntable of a radiance field (PNG strip + GIF) and a loss curve,
both dependency-free (PIL)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from t3d.render.cameras import CameraBatch, CameraParams, orbit_cameras
from t3d.render.volume import render


@torch.no_grad()
def render_turntable(
    field, camera: CameraParams, n: int, size: int, ambient: float = 0.35, elevation: float = 15.0
) -> torch.Tensor:
    cams = orbit_cameras(camera, n, elevation_deg=elevation)
    frames = []
    for i in range(n):
        out = render(field, _one(cams, i), size, n_samples=64, shading="lambertian", ambient=ambient, chunk_rays=4096)
        frames.append(out["rgb"][0])
    return torch.stack(frames).clamp(0, 1)


def _one(cams: CameraBatch, i: int) -> CameraBatch:
    return CameraBatch(
        cams.azimuth[i : i + 1], cams.elevation[i : i + 1], cams.radius[i : i + 1], cams.fov_deg, cams.c2w[i : i + 1]
    )


def _to_pil(img: torch.Tensor):
    from PIL import Image

    arr = (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype("uint8")
    return Image.fromarray(arr)


def write_previews(frames: torch.Tensor, folder: Path, strip_views: int = 8) -> None:
    step = max(1, frames.shape[0] // strip_views)
    strip = torch.cat(list(frames[::step][:strip_views]), dim=2)
    _to_pil(strip).save(Path(folder) / "turntable.png")
    images = [_to_pil(f) for f in frames]
    images[0].save(Path(folder) / "turntable.gif", save_all=True, append_images=images[1:], duration=80, loop=0)


def write_loss_curve(history: list[dict], path: Path, key: str = "loss", size=(480, 240)) -> None:
    """A dependency-free line plot (PIL): raw values faint, a running mean bold."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    values = [r[key] for r in history if math.isfinite(r.get(key, float("nan")))]
    if len(values) >= 2:
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1.0
        margin = 24

        def xy(i, v):
            return margin + (w - 2 * margin) * i / (len(values) - 1), h - margin - (h - 2 * margin) * (v - lo) / (
                hi - lo
            )

        draw.line([xy(i, v) for i, v in enumerate(values)], fill=(190, 190, 230), width=1)
        k = max(1, len(values) // 50)
        smooth = [sum(values[max(0, i - k) : i + 1]) / len(values[max(0, i - k) : i + 1]) for i in range(len(values))]
        draw.line([xy(i, v) for i, v in enumerate(smooth)], fill=(30, 30, 160), width=2)
        draw.text((margin, 4), f"{key}: {values[0]:.4g} -> {smooth[-1]:.4g} ({len(values)} steps)", fill="black")
        draw.text((margin, h - margin + 6), f"min {lo:.4g}  max {hi:.4g}", fill="black")
    img.save(path)
