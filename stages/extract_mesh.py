"""extract_mesh: the coarse field becomes a textured mesh (Magic3D's hand-over to the fine stage).

Reads the coarse stage's field (field.safetensors + field.json), samples its density on a grid,
extracts the iso-surface (automatic threshold unless given; t3d.mesh.extract explains the rule), keeps the
largest piece, decimates to a face budget, unwraps UVs with xatlas, and bakes the field's albedo
into a texture by rasterizing the UV layout. With geometry.steps > 0 the surface is first refined
with SDS on a signed-distance grid through the rasterizer (t3d.mesh.dmtet, Magic3D's DMTet step).
Writes:
  mesh.glb                 the textured mesh (y-up glTF; read it back with `load_mesh`)
  texture.png              the baked albedo (also inside mesh.glb)
  turntable.gif / .png     the mesh itself rendered with the rasterizer, around the object
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from t3d.fields.nerf import load_field
from t3d.mesh.dmtet import GeometryParams, GeometryTrainer
from t3d.mesh.export import TexturedMesh, bake_texture, export_glb, load_textured, turntable, unwrap
from t3d.mesh.extract import auto_threshold, clean_mesh, extract_mesh, sample_grid
from t3d.render.previews import write_loss_curve
from t3d.render.raster import RasterBackend
from t3d.stage import Stage, StageContext, StageParams, run_resumable
from t3d.stages.encode_prompt import load_embeddings
from t3d.toy.metrics import evaluate_mesh

MESH_FILE = "mesh.glb"
TEXTURE_FILE = "texture.png"


class ExtractMeshParams(StageParams):
    resolution: int = Field(
        96,
        ge=16,
        le=512,
        description="marching-cubes grid samples per side; unused (and out of the key) while geometry.steps > 0",
    )
    threshold: float | None = Field(
        None, gt=0, description="density iso-level; None: automatic (level at the rendered surface)"
    )
    max_faces: int = Field(
        10000, ge=100, description="decimation budget (xatlas takes ~0.7 s at 10k faces, ~10 s at 55k)"
    )
    keep_largest: bool = Field(True, description="drop floaters: keep the largest connected piece")
    texture_size: int = Field(512, ge=64, le=4096)
    texture_padding: int = Field(8, ge=0, description="texels of colour dilation around each UV chart")
    preview_size: int = Field(128, ge=16)
    preview_frames: int = Field(24, ge=4)
    geometry: GeometryParams = Field(
        default_factory=GeometryParams, description="SDS refinement of the surface on an SDF grid (t3d.mesh.dmtet)"
    )
    checkpoint_every: int = Field(50, ge=1, description="geometry refinement's checkpoint interval")

    def key_params(self) -> dict:
        """Leave out what the chosen path never reads: with geometry refinement on, the SDF grid
        (geometry.resolution) samples the field and `resolution` is unused; with it off, the
        geometry block and the checkpoint interval are."""
        params = super().key_params()
        if self.geometry.steps > 0:
            del params["resolution"]
        else:
            params["geometry"] = {"steps": 0}
            del params["checkpoint_every"]
        return params


def write_mesh(folder: Path, tmesh: TexturedMesh, camera, raster: RasterBackend, device, frames: int, size: int):
    """This stage's artifact layout, which texture writes too and export reads: mesh.glb,
    texture.png and a turntable of the GLB read back (gif + png strip)."""
    from PIL import Image

    export_glb(folder / MESH_FILE, tmesh)
    Image.fromarray(tmesh.texture).save(folder / TEXTURE_FILE)
    turntable(
        folder / MESH_FILE,
        folder / "turntable.gif",
        frames,
        size,
        radius=camera.radius,
        fov_deg=camera.fov_deg,
        strip_path=folder / "turntable.png",
        raster=raster,
        device=device,
    )


def load_mesh(folder: Path) -> TexturedMesh:
    """The textured mesh this stage wrote, in t3d world coordinates (z up)."""
    return load_textured(Path(folder) / MESH_FILE)


def _refined_surface(ctx: StageContext, field, raster: RasterBackend):
    """SDS on an SDF grid initialised from the field's occupancy (t3d.mesh.dmtet), then the usual clean-up."""
    p: ExtractMeshParams = ctx.params
    prior = ctx.load_prior()
    emb = load_embeddings(ctx.inputs["encode_prompt"]).to(prior.device, prior.dtype)
    with torch.no_grad():
        sigma, lo, spacing = sample_grid(field.density, p.geometry.resolution, field.params.bound, device=ctx.device)
    sigma = np.nan_to_num(sigma, nan=0.0, posinf=np.float32(3e38)).clip(min=0.0)
    tau = auto_threshold(sigma, spacing) if p.threshold is None else float(p.threshold)

    def albedo(points: torch.Tensor) -> torch.Tensor:
        return field.query(points.to(field.device))[1]

    trainer = GeometryTrainer(
        sigma,
        lo,
        spacing,
        tau,
        albedo,
        prior,
        emb,
        ctx.camera,
        p.geometry,
        ctx.generator("geometry"),
        raster=raster,
        device=ctx.device,
    )
    run_resumable(ctx, trainer, p.geometry.steps, p.checkpoint_every, "geometry (sds on sdf)")
    verts, faces = trainer.surface()
    history = trainer.history
    mesh = clean_mesh(verts.cpu().numpy(), faces.cpu().numpy(), keep_largest=p.keep_largest, max_faces=p.max_faces)
    mesh.metadata.update({"threshold": tau, "resolution": int(p.geometry.resolution)})
    return mesh, history


def run(ctx: StageContext) -> None:
    p: ExtractMeshParams = ctx.params
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    field = load_field(ctx.inputs.get("refine", ctx.inputs["coarse"]), ctx.backends.hashgrid)
    field.eval()
    raster = ctx.backends.raster
    ctx.backend.update(hashgrid=field.backend.as_dict(), raster=raster.choice.as_dict())

    if p.geometry.steps:
        mesh, history = _refined_surface(ctx, field, raster)
        timings["geometry_s"] = time.perf_counter() - t0
        (ctx.out / "geometry_losses.json").write_text(json.dumps(history))
        write_loss_curve(history, ctx.out / "geometry_loss_curve.png")
    else:
        with torch.no_grad():
            mesh = extract_mesh(
                field.density,
                p.resolution,
                field.params.bound,
                p.threshold,
                max_faces=p.max_faces,
                keep_largest=p.keep_largest,
                device=ctx.device,
            )
        timings["marching_cubes_s"] = time.perf_counter() - t0
    ctx.log.info("extract_mesh: %d faces at threshold %.4g", len(mesh.faces), mesh.metadata["threshold"])

    t1 = time.perf_counter()
    verts, faces, uvs, _ = unwrap(
        mesh, max_faces=None, texture_size=p.texture_size, padding=max(1, p.texture_padding // 2)
    )
    timings["unwrap_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()

    def albedo(points: torch.Tensor) -> torch.Tensor:
        return field.query(points.to(field.device))[1]

    texture = bake_texture(
        verts, faces, uvs, albedo, size=p.texture_size, padding=p.texture_padding, device=ctx.device, raster=raster
    )
    timings["bake_s"] = time.perf_counter() - t2
    tmesh = TexturedMesh(verts, faces, uvs, texture)

    t3 = time.perf_counter()
    write_mesh(ctx.out, tmesh, ctx.camera, raster, ctx.device, p.preview_frames, p.preview_size)
    timings["write_and_turntable_s"] = time.perf_counter() - t3
    ctx.timings.update({k: round(v, 3) for k, v in timings.items()})
    ctx.metrics.update(
        {
            "threshold": round(float(mesh.metadata["threshold"]), 5),
            "faces": int(len(faces)),
            "vertices": int(len(verts)),
            "watertight": bool(mesh.is_watertight),
            "area": round(float(mesh.area), 5),
            "volume": round(float(mesh.volume), 5) if mesh.is_watertight else None,
            "extent": [round(float(x), 4) for x in mesh.extents],
        }
    )
    ctx.metrics.update(evaluate_mesh(tmesh, ctx.prompt, ctx.camera, raster=raster, device=ctx.device))


STAGE = Stage(
    name="extract_mesh",
    version="5",  # 4: the geometry correction is clamped inside the band (same params, closed surface);
    # 5: decimation's mirrored face pairs (zero-volume flaps) are dropped, so a closed surface stays watertight
    params=ExtractMeshParams,
    inputs=("encode_prompt", "coarse"),
    optional_inputs=("refine",),
    run=run,
    description="marching cubes on the coarse field, decimate, xatlas UVs, albedo baked into a texture",
)
