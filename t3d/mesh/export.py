"""UV unwrapping, texture baking, GLB/OBJ export and turntable previews (GIF, PNG strip, MP4) of the exported asset.

Conventions:
- UVs are OpenGL's (origin bottom-left, v up), like OBJ and nvdiffrast; glTF's v-down is applied
  by trimesh's GLB writer (and undone by its reader).
- Texture arrays are PNG-oriented uint8 [H,W,3]: row 0 is the TOP (v = 1). The rasterizer's
  texture tensors are the vertical flip of that (row 0 is v = 0).
- World space is t3d's: z up, the object's front facing +x. glTF and OBJ viewers expect y up, so
  exports (by default) rotate into (X, Y, Z) = (y, z, x): up becomes +Y and the front faces +Z,
  glTF's "front". Loading an exported file for the turntable rotates back.
- Materials avoid trimesh's dark, metallic default: GLB uses PBR metallic 0, roughness 1,
  baseColorFactor 1; OBJ uses a white diffuse (Kd 1 1 1) and files named after the asset.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import trimesh
from PIL import Image

from t3d.mesh.extract import decimate

if TYPE_CHECKING:
    from t3d.render.raster import RasterBackend

log = logging.getLogger(__name__)

__all__ = [
    "TexturedMesh",
    "unwrap",
    "bake_texture",
    "dilate_texture",
    "export_glb",
    "export_obj",
    "load_textured",
    "turntable",
    "render_turntable",
    "save_turntable",
    "write_turntable_video",
    "TurntableViews",
    "DEPTH_HALF_RANGE",
    "check_name",
    "ZUP_TO_YUP",
]

ColorFn = Callable[[torch.Tensor], torch.Tensor]

# t3d world (z up, front +x) -> glTF/OBJ convention (y up, front +z): (X, Y, Z) = (y, z, x).
ZUP_TO_YUP = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> str:
    """Asset names become file names (NAME.obj, NAME.mtl, NAME.png): letters, digits, . _ - only."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(f"asset name {name!r} is not slug-safe: use letters, digits, '.', '_', '-' (max 128)")
    return name


@dataclass
class TexturedMesh:
    """A mesh with per-vertex UVs and its baked texture, in t3d world coordinates.

    verts [V,3] float32, faces [F,3] int32, uvs [V,2] float32 (OpenGL: v up),
    texture [H,W,3] uint8 PNG-oriented (row 0 = top = v 1).
    """

    verts: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray
    texture: np.ndarray

    def __post_init__(self):
        self.verts = np.asarray(self.verts, dtype=np.float32)
        self.faces = np.asarray(self.faces, dtype=np.int32)
        self.uvs = np.asarray(self.uvs, dtype=np.float32)
        self.texture = np.asarray(self.texture, dtype=np.uint8)
        if self.verts.shape[0] != self.uvs.shape[0]:
            raise ValueError("verts and uvs must have one row per vertex")
        if self.texture.ndim != 3 or self.texture.shape[2] not in (3, 4):
            raise ValueError(f"texture must be [H,W,3|4] uint8, got {self.texture.shape}")

    def to_trimesh(self, y_up: bool = True) -> trimesh.Trimesh:
        """A trimesh with a PBR material (metallic 0, roughness 1, base colour factor 1)."""
        verts = self.verts @ ZUP_TO_YUP.T if y_up else self.verts
        material = trimesh.visual.material.PBRMaterial(
            name="t3d_material",
            baseColorTexture=Image.fromarray(self.texture),
            baseColorFactor=[255, 255, 255, 255],
            metallicFactor=0.0,
            roughnessFactor=1.0,
            doubleSided=False,
        )
        visual = trimesh.visual.TextureVisuals(uv=self.uvs.astype(np.float64), material=material)
        return trimesh.Trimesh(vertices=verts.astype(np.float64), faces=self.faces, visual=visual, process=False)


# ----------------------------------------------------------------------------------------------
# UV unwrap
# ----------------------------------------------------------------------------------------------


def unwrap(
    mesh: trimesh.Trimesh,
    max_faces: int | None = 20000,
    texture_size: int = 1024,
    padding: int = 4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """xatlas UV atlas: (verts [V',3] float32, faces [F,3] int32, uvs [V',2] float32, vmapping [V']).

    vmapping maps each new vertex to its source vertex (of the decimated mesh when `max_faces`
    decimates first: xatlas takes ~10 s on 55k faces, ~0.7 s on 10k). `padding` is in texels of a
    `texture_size` texture; charts are packed for bilinear sampling.
    """
    import xatlas

    if max_faces is not None and len(mesh.faces) > max_faces:
        mesh = decimate(mesh, max_faces)
    positions = np.ascontiguousarray(mesh.vertices, dtype=np.float32)
    indices = np.ascontiguousarray(mesh.faces, dtype=np.uint32)
    atlas = xatlas.Atlas()
    atlas.add_mesh(positions, indices)
    chart_options = xatlas.ChartOptions()
    pack_options = xatlas.PackOptions()
    pack_options.resolution = int(texture_size)
    pack_options.padding = int(padding)
    pack_options.bilinear = True
    atlas.generate(chart_options, pack_options)
    vmapping, new_faces, uvs = atlas[0]
    vmapping = vmapping.astype(np.int64)
    return positions[vmapping], new_faces.astype(np.int32), uvs.astype(np.float32), vmapping


# ----------------------------------------------------------------------------------------------
# Texture baking
# ----------------------------------------------------------------------------------------------


def dilate_texture(rgb: torch.Tensor, mask: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow colours into empty texels: each pass fills empty texels next to filled ones with the
    mean of their filled 3x3 neighbours. rgb [H,W,C] float, mask [H,W] bool."""
    img = rgb.permute(2, 0, 1)[None] * mask[None, None]
    m = mask[None, None].to(rgb.dtype)
    kernel = torch.ones(1, 1, 3, 3, dtype=rgb.dtype, device=rgb.device)
    ch = img.shape[1]
    for _ in range(int(iterations)):
        if bool(m.all()):
            break
        cnt = torch.nn.functional.conv2d(m, kernel, padding=1)
        acc = torch.nn.functional.conv2d(img, kernel.expand(ch, 1, 3, 3), padding=1, groups=ch)
        grow = (m == 0) & (cnt > 0)
        img = torch.where(grow, acc / cnt.clamp_min(1), img)
        m = torch.where(grow, torch.ones_like(m), m)
    return img[0].permute(1, 2, 0), m[0, 0] > 0


@torch.no_grad()
def bake_texture(
    verts,
    faces,
    uvs,
    color_fn: ColorFn,
    size: int = 512,
    padding: int = 8,
    *,
    chunk: int = 1 << 16,
    device: torch.device | str = "cpu",
    raster: RasterBackend,
    return_mask: bool = False,
):
    """Bake color_fn (world points [N,3] -> rgb [N,3] in [0,1]) into a PNG-oriented uint8 [size,size,3].

    The UV layout is rasterized with t3d.render.raster (uv as clip-space positions) to find each covered
    texel's world point; colours are then dilated `padding` texels into the empty space around
    every chart (against seams under bilinear filtering), and the remaining texels get the mean
    colour (keeps the PNG small and mipmaps neutral).
    """
    device = torch.device(device)
    v = torch.as_tensor(np.asarray(verts), dtype=torch.float32, device=device)
    f = torch.as_tensor(np.asarray(faces), dtype=torch.int32, device=device)
    uv = torch.as_tensor(np.asarray(uvs), dtype=torch.float32, device=device)
    pos = torch.cat([uv * 2 - 1, torch.zeros_like(uv[:, :1]), torch.ones_like(uv[:, :1])], -1)[None].contiguous()
    rast, _ = raster.rasterize(pos, f, (size, size))
    xyz, _ = raster.interpolate(v[None].contiguous(), rast, f)
    mask = rast[0, ..., 3] > 0  # [size,size], row 0 = v 0
    pts = xyz[0][mask]
    cols = []
    for s in range(0, pts.shape[0], chunk):
        c = color_fn(pts[s : s + chunk])
        cols.append(torch.as_tensor(c, device=device).reshape(-1, 3).float())
    rgb = torch.zeros(size, size, 3, device=device)
    if cols:
        rgb[mask] = torch.cat(cols).clamp(0, 1)
    rgb, filled = dilate_texture(rgb, mask, padding)
    if bool(filled.any()) and not bool(filled.all()):
        rgb[~filled] = rgb[filled].mean(0)
    png = (rgb.flip(0) * 255 + 0.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
    if return_mask:
        return png, mask.flip(0).cpu().numpy()
    return png


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def export_glb(path: str | Path, tmesh: TexturedMesh, y_up: bool = True) -> Path:
    """Binary glTF with the texture embedded and a PBR material (metallic 0, roughness 1)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mesh = tmesh.to_trimesh(y_up=y_up)
    data = mesh.export(file_type="glb", include_normals=True)
    path.write_bytes(data)
    return path


def export_obj(folder: str | Path, name: str, tmesh: TexturedMesh, y_up: bool = True) -> dict[str, Path]:
    """NAME.obj + NAME.mtl (white diffuse, map_Kd NAME.png) + NAME.png in `folder`."""
    check_name(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    verts = tmesh.verts.astype(np.float64) @ (ZUP_TO_YUP.T if y_up else np.eye(3))
    normals = trimesh.Trimesh(verts, tmesh.faces, process=False).vertex_normals
    paths = {"obj": folder / f"{name}.obj", "mtl": folder / f"{name}.mtl", "png": folder / f"{name}.png"}
    Image.fromarray(tmesh.texture).save(paths["png"])
    paths["mtl"].write_text(
        f"# t3d\nnewmtl {name}\nKa 0.000000 0.000000 0.000000\nKd 1.000000 1.000000 1.000000\n"
        f"Ks 0.000000 0.000000 0.000000\nNs 1.000000\nd 1.000000\nillum 1\nmap_Kd {name}.png\n"
    )
    lines = [f"# t3d: {len(verts)} vertices, {len(tmesh.faces)} faces", f"mtllib {name}.mtl", f"o {name}"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in verts]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in tmesh.uvs]
    lines += [f"vn {x:.6f} {y:.6f} {z:.6f}" for x, y, z in normals]
    lines.append(f"usemtl {name}")
    lines += [f"f {a}/{a}/{a} {b}/{b}/{b} {c}/{c}/{c}" for a, b, c in (tmesh.faces.astype(np.int64) + 1)]
    paths["obj"].write_text("\n".join(lines) + "\n")
    return paths


def load_textured(path: str | Path, y_up: bool = True) -> TexturedMesh:
    """Load an exported GLB/OBJ back into t3d world coordinates (undoing the y-up rotation)."""
    loaded = trimesh.load(str(path), force="mesh", process=False)
    visual = loaded.visual
    uv = getattr(visual, "uv", None)
    if uv is None:
        raise ValueError(f"{path} has no texture coordinates")
    material = visual.material
    image = getattr(material, "baseColorTexture", None)
    if image is None:
        image = getattr(material, "image", None)
    if image is None:
        raise ValueError(f"{path} has no base colour texture")
    tex = np.asarray(image.convert("RGB"))
    verts = np.asarray(loaded.vertices, dtype=np.float64)
    if y_up:
        verts = verts @ ZUP_TO_YUP  # inverse of the (orthonormal) rotation
    return TexturedMesh(verts, np.asarray(loaded.faces), np.asarray(uv), tex)


# ----------------------------------------------------------------------------------------------
# Turntable
# ----------------------------------------------------------------------------------------------

DEPTH_HALF_RANGE = 1.2  # depth frames map camera distance radius -+ this to white..black (fixed: comparable runs)


@dataclass
class TurntableViews:
    """One render pass around the object: uint8 [N,S,S,3] frames at azimuth start + i * 360 / N.

    rgb: the texture (shaded, white background); normal: world normal * 0.5 + 0.5 (white
    background); depth: grey, distance from the camera mapped from radius - DEPTH_HALF_RANGE
    (white, near) to radius + DEPTH_HALF_RANGE (black, far); the background is black, as if
    infinitely far, so the silhouette stays visible and nearer always reads brighter.
    """

    rgb: np.ndarray
    normal: np.ndarray
    depth: np.ndarray

    def every(self, n_frames: int) -> TurntableViews:
        """The n_frames-frame turntable inside this one (same azimuths as rendering n_frames directly)."""
        total = len(self.rgb)
        if n_frames <= 0 or total % n_frames:
            raise ValueError(f"{n_frames} frames are not an even subset of the {total} rendered")
        step = total // n_frames
        return TurntableViews(self.rgb[::step], self.normal[::step], self.depth[::step])

    def side_by_side(self) -> np.ndarray:
        """[N, S, 3S, 3] frames: RGB | normals | depth."""
        return np.concatenate([self.rgb, self.normal, self.depth], axis=2)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def render_turntable(
    mesh_or_path: TexturedMesh | str | Path,
    n_frames: int = 24,
    size: int = 256,
    *,
    elevation_deg: float = 15.0,
    radius: float = 2.5,
    fov_deg: float = 40.0,
    start_deg: float = 0.0,
    background: float = 1.0,
    shading: float = 0.25,
    raster: RasterBackend,
    device: torch.device | str = "cpu",
    batch: int = 8,
    y_up: bool = True,
) -> TurntableViews:
    """Rasterize the textured mesh around the z axis once, keeping RGB, normals and depth per frame.

    A path is loaded with `load_textured` (so the check covers the file as written; `y_up` as it
    was exported); colours are the texture looked up by UV, optionally dimmed by
    `shading` * (1 - n.l) with a headlight so the shape reads; `background` fills empty RGB pixels.
    """
    from t3d.render.cameras import make_cameras
    from t3d.render.raster import render_mesh

    tm = mesh_or_path if isinstance(mesh_or_path, TexturedMesh) else load_textured(mesh_or_path, y_up=y_up)
    device = torch.device(device)
    v = torch.as_tensor(tm.verts, dtype=torch.float32, device=device)
    f = torch.as_tensor(tm.faces, dtype=torch.int32, device=device)
    uv = torch.as_tensor(tm.uvs, dtype=torch.float32, device=device)
    tex = (
        torch.as_tensor(np.ascontiguousarray(tm.texture[::-1, :, :3]), device=device).float() / 255.0
    )  # GL orientation
    az = [start_deg + i * 360.0 / n_frames for i in range(n_frames)]
    rgbs, normals, depths = [], [], []
    for s in range(0, n_frames, batch):
        cams = make_cameras(az[s : s + batch], [elevation_deg] * len(az[s : s + batch]), radius, fov_deg).to(device)
        out = render_mesh(v, f, cams, size, raster=raster, uvs=uv, tex=tex, antialias_rgb=False)
        mask = out["mask"]
        to_eye = cams.c2w[:, None, None, :3, 3] - out["xyz"]
        distance = to_eye.norm(dim=-1, keepdim=True)
        rgb = out["rgb"]
        if shading > 0:
            ndl = (out["normal"] * to_eye / distance.clamp_min(1e-8)).sum(-1, keepdim=True).abs()
            rgb = rgb * (1 - shading * (1 - ndl))
        rgbs.append(_to_uint8(rgb * mask + background * (1 - mask)))
        normals.append(_to_uint8((out["normal"] * 0.5 + 0.5) * mask + (1 - mask)))
        nearness = (radius + DEPTH_HALF_RANGE - distance) / (2 * DEPTH_HALF_RANGE)
        depths.append(_to_uint8((nearness.clamp(0, 1) * mask).expand(-1, -1, -1, 3)))
    return TurntableViews(np.concatenate(rgbs), np.concatenate(normals), np.concatenate(depths))


def save_turntable(
    frames: np.ndarray,
    path_gif: str | Path,
    fps: int = 12,
    strip_path: str | Path | None = None,
    strip_frames: int = 8,
) -> None:
    """uint8 [N,H,W,3] frames as a looping GIF, and optionally a strip PNG of `strip_frames` of them."""
    path_gif = Path(path_gif)
    path_gif.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(fr) for fr in frames]
    images[0].save(
        path_gif, save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0, optimize=False
    )
    if strip_path is not None:
        n_frames = len(frames)
        k = min(strip_frames, n_frames)
        idx = [int(math.floor(i * n_frames / k)) for i in range(k)]
        Image.fromarray(np.concatenate([frames[i] for i in idx], 1)).save(strip_path)


def write_turntable_video(path: str | Path, views: TurntableViews, fps: float = 24, crf: int = 20) -> Path:
    """An MP4 of [RGB | normals | depth] frames: H.264, yuv420p and +faststart, so browsers play it.

    yuv420p needs even sizes: odd ones are padded by one white (bottom/right) pixel. The ffmpeg
    binary is imageio-ffmpeg's; without it (or if it fails) this raises a RuntimeError and leaves
    no file behind.
    """
    import imageio_ffmpeg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = views.side_by_side()
    _, height, width, _ = frames.shape
    pad = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))
    frames = np.ascontiguousarray(np.pad(frames, pad, constant_values=255))
    try:
        writer = imageio_ffmpeg.write_frames(
            str(path),
            (frames.shape[2], frames.shape[1]),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=None,
            macro_block_size=2,
            ffmpeg_log_level="error",
            output_params=["-crf", str(int(crf)), "-movflags", "+faststart"],
        )
        writer.send(None)
        for frame in frames:
            writer.send(frame)
        writer.close()
    except (OSError, RuntimeError) as err:
        path.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not write the turntable video {path.name} with ffmpeg (imageio-ffmpeg's binary): {err}"
        ) from err
    return path


def turntable(
    mesh_or_path: TexturedMesh | str | Path,
    path_gif: str | Path,
    n_frames: int = 24,
    size: int = 256,
    *,
    elevation_deg: float = 15.0,
    radius: float = 2.5,
    fov_deg: float = 40.0,
    start_deg: float = 0.0,
    background: float = 1.0,
    shading: float = 0.25,
    fps: int = 12,
    strip_path: str | Path | None = None,
    strip_frames: int = 8,
    video_path: str | Path | None = None,
    video_frames: int | None = None,
    video_fps: float = 24,
    raster: RasterBackend,
    device: torch.device | str = "cpu",
    batch: int = 8,
    y_up: bool = True,
) -> np.ndarray:
    """Render the exported, textured mesh itself around the z axis into a GIF (+ a strip PNG, + an MP4).

    See `render_turntable` for the views. With `video_path`, one pass renders `video_frames`
    (default n_frames; a multiple of it) frames for the [RGB | normals | depth] MP4, and the GIF
    takes every k-th of them. Returns the GIF's frames, uint8 [n_frames, size, size, 3].
    """
    total = (video_frames or n_frames) if video_path is not None else n_frames
    if total % n_frames:
        raise ValueError(f"video_frames ({total}) must be a multiple of n_frames ({n_frames})")
    views = render_turntable(
        mesh_or_path,
        total,
        size,
        elevation_deg=elevation_deg,
        radius=radius,
        fov_deg=fov_deg,
        start_deg=start_deg,
        background=background,
        shading=shading,
        raster=raster,
        device=device,
        batch=batch,
        y_up=y_up,
    )
    frames = views.every(n_frames).rgb
    save_turntable(frames, path_gif, fps, strip_path, strip_frames)
    if video_path is not None:
        write_turntable_video(video_path, views, fps=video_fps)
    return frames
