"""texture: fine-tune the mesh's colours through the differentiable rasterizer (Magic3D's fine stage).

The texture field is the radiance field's own albedo (the refine field when that stage ran, else
the coarse one), so optimization starts exactly from the colours extract_mesh baked. Each step
rasterizes the fixed mesh at a higher resolution than the NeRF stages, queries the albedo at the
visible surface points, shades (albedo or lambertian with the camera-fixed light), composites on
white and scores the image with SDS or VSD. The result is re-baked into the mesh's UV texture
and written in extract_mesh's layout (mesh.glb, texture.png), which export reads.
"""

from __future__ import annotations

import json
import math
import time
from typing import Literal

import torch
from pydantic import Field

from t3d.guidance.sds import CFG_CONVENTION, TRange, anneal_t_range, guidance_loss
from t3d.mesh.export import TexturedMesh, bake_texture, export_glb, turntable
from t3d.render.cameras import CameraBatch, sample_cameras, view_names
from t3d.render.raster import render_mesh
from t3d.render.volume import light_directions
from t3d.stage import Stage, StageContext, StageParams, flatten_optimizer, restore_optimizer
from t3d.stages.coarse import load_field, write_loss_curve
from t3d.stages.encode_prompt import load_embeddings
from t3d.stages.extract_mesh import MESH_FILE, TEXTURE_FILE, load_mesh
from t3d.toy.metrics import evaluate_mesh


class TextureParams(StageParams):
    steps: int = Field(150, ge=1)
    guidance: Literal["sds", "vsd"] = Field(
        "sds", description="vsd uses a camera-conditioned LoRA as the refine stage does"
    )
    batch_size: int = Field(2, ge=1)
    resolution: int = Field(64, ge=16, description="raster size (the coarse stage renders 32)")
    lr_grid: float = Field(5e-3, gt=0)
    lr_mlp: float = Field(1e-3, gt=0)
    guidance_scale: float | None = Field(None, description="None: the prior's default (vsd: 7.5). " + CFG_CONVENTION)
    t_range: TRange = (0.02, 0.5)
    t_range_end: TRange | None = (0.02, 0.3)
    shading: Literal["lambertian", "albedo"] = "lambertian"
    albedo_prob: float = Field(0.3, ge=0, le=1, description="fraction of steps rendered with albedo only")
    ambient: float = Field(0.35, ge=0, le=1)
    lora_rank: int = Field(4, ge=1, description="vsd only")
    lora_lr: float = Field(1e-3, gt=0, description="vsd only")
    texture_size: int = Field(512, ge=64, le=4096)
    texture_padding: int = Field(8, ge=0)
    checkpoint_every: int = Field(50, ge=1)
    preview_size: int = Field(128, ge=16)
    preview_frames: int = Field(24, ge=4)

    def key_params(self) -> dict:
        """SDS trains no LoRA: its rank and learning rate change nothing then."""
        params = super().key_params()
        if self.guidance == "sds":
            del params["lora_rank"], params["lora_lr"]
        return params


def shade_mesh_image(field, raster: dict, cameras: CameraBatch, shading: str, ambient: float) -> torch.Tensor:
    """[B,3,H,W] in [0,1]: the field's albedo at the visible surface, shaded, on white."""
    mask = raster["mask"][..., 0] > 0
    albedo = torch.ones(*mask.shape, 3, device=mask.device)
    if mask.any():
        albedo = albedo.masked_scatter(
            mask[..., None].expand_as(albedo), field.query(raster["xyz"][mask])[1].reshape(-1)
        )
    if shading == "lambertian":
        light = light_directions(cameras)  # [B,3] world, the toy world's camera-fixed light
        lam = (raster["normal"] * light[:, None, None, :]).sum(-1, keepdim=True).clamp_min(0)
        albedo = albedo * (ambient + (1 - ambient) * lam)
    cov = raster["mask"]
    return (albedo * cov + (1 - cov)).permute(0, 3, 1, 2).clamp(0, 1)


def run(ctx: StageContext) -> None:
    p: TextureParams = ctx.params
    prior = ctx.load_prior()
    emb = load_embeddings(ctx.inputs["encode_prompt"]).to(prior.device, prior.dtype)
    camera = ctx.camera
    source = ctx.inputs.get("refine", ctx.inputs["coarse"])
    field = load_field(source, ctx.backends.hashgrid)
    field.requires_grad_(True)
    tmesh = load_mesh(ctx.inputs["extract_mesh"])
    verts = torch.as_tensor(tmesh.verts, device=ctx.device)
    faces = torch.as_tensor(tmesh.faces, device=ctx.device)
    raster = ctx.backends.raster
    ctx.backend.update(hashgrid=field.backend.as_dict(), raster=raster.choice.as_dict())

    opt = torch.optim.Adam(
        [
            {"params": list(field.encoding.parameters()), "lr": p.lr_grid},
            {"params": list(field.mlp.parameters()), "lr": p.lr_mlp},
        ],
        betas=(0.9, 0.99),
        eps=1e-15,
    )
    gen = torch.Generator().manual_seed(int(ctx.seed) * 15485863 + 11)
    lora = lora_opt = None
    if p.guidance == "vsd":
        from t3d.guidance.vsd import make_lora_unet, trainable_parameters

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(ctx.seed))
            lora = make_lora_unet(prior.unet, rank=p.lora_rank)
        lora_opt = torch.optim.AdamW(trainable_parameters(lora), lr=p.lora_lr, weight_decay=0.0)
    history: list[dict] = []
    step = 0
    resumed = ctx.load_checkpoint()
    if resumed is not None:
        step, tensors, meta = resumed
        field.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("field.")})
        restore_optimizer(opt, tensors, meta["opt"])
        gen.set_state(tensors["rng"])
        if lora is not None:
            from t3d.guidance.vsd import load_lora_state

            load_lora_state(lora, {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
            restore_optimizer(lora_opt, tensors, meta["lora_opt"], "lopt")
        history = meta["history"]
        ctx.metrics["resumed_from"] = int(step)

    with ctx.progress(p.steps, f"texture ({p.guidance})", initial=step) as update:
        while step < p.steps:
            cams = sample_cameras(camera, p.batch_size, gen).to(ctx.device)
            with torch.no_grad():
                rendered = render_mesh(verts, faces, cams, p.resolution, raster=raster, antialias_rgb=False)
            shading = "albedo" if torch.rand(1, generator=gen).item() < p.albedo_prob else p.shading
            rgb = shade_mesh_image(field, rendered, cams, shading, p.ambient)
            cond, uncond = emb.for_views(view_names(cams, camera)), emb.uncond_batch(p.batch_size)
            t_range = anneal_t_range(step, p.steps, p.t_range, p.t_range_end, "linear")
            record = {"step": step}
            if lora is None:
                loss, info = guidance_loss(
                    "sds", prior, rgb, cond, uncond, guidance_scale=p.guidance_scale, t_range=t_range, generator=gen
                )
            else:
                from t3d.guidance.vsd import lora_loss, vsd_loss

                loss, x0, info = vsd_loss(
                    prior,
                    lora,
                    rgb,
                    cams.c2w,
                    cond,
                    uncond,
                    guidance_scale=p.guidance_scale or 7.5,
                    t_range=t_range,
                    generator=gen,
                )
                l_lora = lora_loss(prior, lora, x0, cams.c2w, cond, generator=gen)
                lora_opt.zero_grad(set_to_none=True)
                l_lora.backward()
                lora_opt.step()
                record["lora_loss"] = float(l_lora.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            record.update(loss=float(loss.detach()), grad_norm=info["grad_norm"])
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(
                    f"texture: loss is {record['loss']} at step {step}; lower lr_grid or guidance_scale"
                )
            history.append(record)
            step += 1
            update(1, loss=record["loss"])
            if step % p.checkpoint_every == 0 and step < p.steps:
                tensors = {f"field.{k}": v for k, v in field.state_dict().items()}
                opt_t, opt_meta = flatten_optimizer(opt)
                tensors.update(opt_t, rng=gen.get_state())
                meta = {"opt": opt_meta, "history": history}
                if lora is not None:
                    from t3d.guidance.vsd import lora_state

                    tensors.update({f"lora.{k}": v for k, v in lora_state(lora).items()})
                    lora_t, meta["lora_opt"] = flatten_optimizer(lora_opt, "lopt")
                    tensors.update(lora_t)
                ctx.save_checkpoint(step, tensors, meta)

    started = time.perf_counter()
    with torch.no_grad():
        texture = bake_texture(
            tmesh.verts,
            tmesh.faces,
            tmesh.uvs,
            lambda pts: field.query(pts.to(field.device))[1],
            size=p.texture_size,
            padding=p.texture_padding,
            device=ctx.device,
            raster=raster,
        )
    out_mesh = TexturedMesh(tmesh.verts, tmesh.faces, tmesh.uvs, texture)
    export_glb(ctx.out / MESH_FILE, out_mesh)
    from PIL import Image

    Image.fromarray(texture).save(ctx.out / TEXTURE_FILE)
    turntable(
        ctx.out / MESH_FILE,
        ctx.out / "turntable.gif",
        p.preview_frames,
        p.preview_size,
        radius=camera.radius,
        fov_deg=camera.fov_deg,
        strip_path=ctx.out / "turntable.png",
        raster=raster,
        device=ctx.device,
    )
    (ctx.out / "losses.json").write_text(json.dumps(history))
    write_loss_curve(history, ctx.out / "loss_curve.png")
    ctx.timings["bake_and_preview_s"] = round(time.perf_counter() - started, 3)
    last = history[-min(20, len(history)) :]
    ctx.metrics.update(steps=p.steps, final_loss=round(sum(r["loss"] for r in last) / max(len(last), 1), 6))
    ctx.metrics.update(evaluate_mesh(out_mesh, ctx.prompt, camera, raster=raster, device=ctx.device))


STAGE = Stage(
    name="texture",
    version="1",
    params=TextureParams,
    inputs=("encode_prompt", "coarse", "extract_mesh"),
    optional_inputs=("refine",),
    run=run,
    description="albedo fine-tuned through the rasterizer with SDS or VSD, re-baked into the UV texture",
)
