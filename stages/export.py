"""export: the final textured mesh as files people can open, plus a turntable of those files.

Reads the textured mesh of the stage before it (mesh.glb, see extract_mesh.load_mesh) and writes
it under the asset's name, a slug of the prompt unless `name` is given:
  NAME.glb                        PBR metallic 0, roughness 1, base colour factor 1 (y-up glTF)
  NAME.obj + NAME.mtl + NAME.png  white diffuse (Kd 1 1 1), texture named after the asset
  turntable.gif / turntable.png   the exported GLB itself, loaded back and rasterized
  turntable.mp4                   the same pass as [RGB | normals | depth] (H.264; turntable_video)

It reads the texture stage's mesh.glb when that stage is enabled, else extract_mesh's (same layout).
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field, field_validator, model_validator

from t3d.mesh.export import (
    check_name,
    export_glb,
    export_obj,
    load_textured,
    render_turntable,
    save_turntable,
    write_turntable_video,
)
from t3d.slug import slugify
from t3d.stage import Stage, StageContext, StageParams
from t3d.stages.extract_mesh import load_mesh

SOURCE = "extract_mesh"
GIF_FPS = 12  # the GIF turntable's frame rate; the MP4 turns as fast


class ExportParams(StageParams):
    name: str | None = Field(None, description="asset file name (letters, digits, . _ -); None: a slug of the prompt")
    formats: list[Literal["glb", "obj"]] = Field(default_factory=lambda: ["glb", "obj"], min_length=1)
    y_up: bool = Field(True, description="rotate t3d's z-up world into glTF/OBJ's y-up (front facing +z)")
    turntable_frames: int = Field(24, ge=4)
    turntable_size: int = Field(256, ge=16)
    turntable_elevation: float = Field(15.0, ge=-89, le=89)
    turntable_video: bool = Field(True, description="also write turntable.mp4: [RGB | normals | depth], H.264")
    turntable_video_frames: int | None = Field(
        None,
        ge=4,
        description="MP4 frames, a multiple of turntable_frames (one pass renders both; one turn = 2 s like the GIF); "
        "None: the GIF's (no extra rendering)",
    )

    @field_validator("name")
    @classmethod
    def _slug_safe(cls, name: str | None) -> str | None:
        return None if name is None else check_name(name)

    @model_validator(mode="after")
    def _gif_frames_within_video(self) -> ExportParams:
        if self.turntable_video_frames is not None and self.turntable_video_frames % self.turntable_frames:
            raise ValueError(
                f"turntable_video_frames ({self.turntable_video_frames}) must be a multiple of "
                f"turntable_frames ({self.turntable_frames}): the GIF takes every k-th frame of the video's pass"
            )
        return self


def run(ctx: StageContext) -> None:
    p: ExportParams = ctx.params
    t0 = time.perf_counter()
    tmesh = load_mesh(ctx.inputs.get("texture", ctx.inputs[SOURCE]))
    name = p.name or slugify(ctx.prompt)
    check_name(name)
    files: list[str] = []
    if "glb" in p.formats:
        export_glb(ctx.out / f"{name}.glb", tmesh, y_up=p.y_up)
        files.append(f"{name}.glb")
    if "obj" in p.formats:
        paths = export_obj(ctx.out, name, tmesh, y_up=p.y_up)
        files += [path.name for path in paths.values()]
    ctx.timings["write_s"] = round(time.perf_counter() - t0, 3)

    # the turntable renders a file as written (the GLB when there is one), not the in-memory mesh
    t1 = time.perf_counter()
    raster = ctx.backends.raster
    ctx.backend["raster"] = raster.choice.as_dict()
    source = ctx.out / (f"{name}.glb" if "glb" in p.formats else f"{name}.obj")
    cam = ctx.camera
    views = render_turntable(
        source,
        (p.turntable_video_frames or p.turntable_frames) if p.turntable_video else p.turntable_frames,
        p.turntable_size,
        elevation_deg=p.turntable_elevation,
        radius=cam.radius,
        fov_deg=cam.fov_deg,
        raster=raster,
        device=ctx.device,
        y_up=p.y_up,
    )
    save_turntable(
        views.every(p.turntable_frames).rgb, ctx.out / "turntable.gif", GIF_FPS, strip_path=ctx.out / "turntable.png"
    )
    ctx.timings["turntable_s"] = round(time.perf_counter() - t1, 3)
    if p.turntable_video:
        t2 = time.perf_counter()
        fps = GIF_FPS * len(views.rgb) / p.turntable_frames  # one turn takes as long as the GIF's
        write_turntable_video(ctx.out / "turntable.mp4", views, fps=fps)  # raises (no file) without ffmpeg
        ctx.timings["turntable_mp4_s"] = round(time.perf_counter() - t2, 3)
    ctx.metrics.update(
        {
            "name": name,
            "files": files,
            "faces": int(len(tmesh.faces)),
            "vertices": int(len(tmesh.verts)),
            "texture": list(tmesh.texture.shape[:2]),
        }
    )
    # Quality of the delivered file itself (toy prompts only): the GLB read back and rasterized.
    from t3d.toy.metrics import evaluate_mesh

    delivered = load_textured(source, y_up=p.y_up) if "glb" in p.formats else tmesh
    ctx.metrics.update(evaluate_mesh(delivered, ctx.prompt, cam, raster=raster, device=ctx.device))


STAGE = Stage(
    name="export",
    version="2",  # 2: turntable.mp4
    params=ExportParams,
    inputs=(SOURCE,),
    optional_inputs=("texture",),
    run=run,
    uses_prior=False,
    description="GLB (PBR, non-metallic) and OBJ+MTL+PNG named after the asset, plus GIF, PNG and MP4 turntables",
)
