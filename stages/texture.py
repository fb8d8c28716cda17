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
import time
from typing import Literal

import torch
from pydantic import Field

from t3d.fields.nerf import load_field
from t3d.guidance.perp_neg import perp_neg_embeddings
from t3d.guidance.sds import CFG_CONVENTION, TRange, anneal_t_range, guidance_loss
from t3d.guidance.vsd import load_lora_state, lora_loss, lora_state, make_lora_branch, vsd_loss
from t3d.mesh.export import TexturedMesh, bake_texture
from t3d.optim import flatten_optimizer, restore_optimizer
from t3d.render.cameras import CameraBatch, sample_cameras, view_names
from t3d.render.previews import write_loss_curve
from t3d.render.raster import RasterBackend, render_mesh
from t3d.render.shading import composite_on_white, shade
from t3d.render.volume import light_directions
from t3d.stage import Stage, StageContext, StageParams, run_resumable, stream_seed
from t3d.stages.encode_prompt import load_embeddings
from t3d.stages.extract_mesh import load_mesh, write_mesh
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
    albedo_prob: float = Field(
        0.0,
        ge=0,
        le=1,
        description=(
            "fraction of steps rendered with albedo only. 0: the toy prior was trained on lit images, and "
            "unlit renders (brighter than any lit one) made SDS darken the texture: at 0.3 the yellow "
            "prompts' colour error was 0.08-0.12 over 4 seeds, at 0 it is 0.034-0.048"
        ),
    )
    ambient: float = Field(0.35, ge=0, le=1)
    perp_neg: bool = Field(
        False, description="Perp-Neg (threestudio's default weights) on the prior's guided prediction"
    )
    lora_rank: int = Field(4, ge=1, description="vsd only")
    lora_lr: float = Field(1e-3, gt=0, description="vsd only")
    texture_size: int = Field(512, ge=64, le=4096)
    texture_padding: int = Field(8, ge=0)
    checkpoint_every: int = Field(50, ge=1)
    preview_size: int = Field(128, ge=16)
    preview_frames: int = Field(24, ge=4)

    def key_params(self) -> dict:
        """SDS trains no LoRA: its rank and learning rate change nothing then. Perp-Neg off: as before it existed."""
        params = super().key_params()
        if self.guidance == "sds":
            del params["lora_rank"], params["lora_lr"]
        if not self.perp_neg:
            del params["perp_neg"]
        return params


def shade_mesh_image(field, rendered: dict, cameras: CameraBatch, shading: str, ambient: float) -> torch.Tensor:
    """[B,3,H,W] in [0,1]: the field's albedo at the visible surface, shaded, on white."""
    mask = rendered["mask"][..., 0] > 0
    albedo = torch.ones(*mask.shape, 3, device=mask.device)
    if mask.any():
        albedo = albedo.masked_scatter(
            mask[..., None].expand_as(albedo), field.query(rendered["xyz"][mask])[1].reshape(-1)
        )
    if shading == "lambertian":
        light = light_directions(cameras)  # [B,3] world, the toy world's camera-fixed light
        albedo = shade(albedo, rendered["normal"], light[:, None, None, :], "lambertian", ambient)
    return composite_on_white(albedo, rendered["mask"]).permute(0, 3, 1, 2).clamp(0, 1)


class TextureTrainer:
    """One SDS or VSD step at a time on the field's albedo, seen through the rasterized mesh."""

    def __init__(
        self, p: TextureParams, prior, emb, field, verts, faces, raster: RasterBackend, camera, device, seed: int
    ):
        self.p, self.prior, self.emb, self.field = p, prior, emb, field
        self.verts, self.faces, self.raster, self.camera, self.device = verts, faces, raster, camera, device
        self.opt = torch.optim.Adam(
            [
                {"params": list(field.encoding.parameters()), "lr": p.lr_grid},
                {"params": list(field.mlp.parameters()), "lr": p.lr_mlp},
            ],
            betas=(0.9, 0.99),
            eps=1e-15,
        )
        self.lr_decay: list = []
        self.gen = torch.Generator().manual_seed(stream_seed(seed, "texture", "noise"))
        self.lora = self.lora_opt = None
        if p.guidance == "vsd":
            self.lora, self.lora_opt = make_lora_branch(
                prior, p.lora_rank, p.lora_lr, stream_seed(seed, "texture", "lora")
            )
        self.step_idx = 0
        self.history: list[dict] = []

    def step(self) -> dict:
        p, prior, gen = self.p, self.prior, self.gen
        cams = sample_cameras(self.camera, p.batch_size, gen).to(self.device)
        with torch.no_grad():
            rendered = render_mesh(self.verts, self.faces, cams, p.resolution, raster=self.raster, antialias_rgb=False)
        shading = "albedo" if torch.rand(1, generator=gen).item() < p.albedo_prob else p.shading
        rgb = shade_mesh_image(self.field, rendered, cams, shading, p.ambient)
        names = view_names(cams, self.camera)
        cond, uncond = self.emb.for_views(names), self.emb.uncond_batch(p.batch_size)
        guided, perp_neg = cond, None
        if p.perp_neg:
            guided, perp_neg = perp_neg_embeddings(self.emb.views, cams.azimuth, [n == "overhead" for n in names])
        t_range = anneal_t_range(self.step_idx, p.steps, p.t_range, p.t_range_end, "linear")
        record = {"step": self.step_idx}
        if self.lora is None:
            loss, info = guidance_loss(
                "sds",
                prior,
                rgb,
                guided,
                uncond,
                guidance_scale=p.guidance_scale,
                t_range=t_range,
                generator=gen,
                perp_neg=perp_neg,
            )
        else:
            loss, x0, info = vsd_loss(
                prior,
                self.lora,
                rgb,
                cams.c2w,
                guided,
                uncond,
                guidance_scale=p.guidance_scale or 7.5,
                t_range=t_range,
                generator=gen,
                lora_cond=cond,
                perp_neg=perp_neg,
            )
            l_lora = lora_loss(prior, self.lora, x0, cams.c2w, cond, generator=gen)
            self.lora_opt.zero_grad(set_to_none=True)
            l_lora.backward()
            self.lora_opt.step()
            record["lora_loss"] = float(l_lora.detach())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        record.update(loss=float(loss.detach()), grad_norm=info["grad_norm"])
        self.history.append(record)
        self.step_idx += 1
        return record

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"field.{k}": v for k, v in self.field.state_dict().items()}
        opt_t, opt_meta = flatten_optimizer(self.opt)
        tensors.update(opt_t, rng=self.gen.get_state())
        meta = {"opt": opt_meta, "history": self.history}
        if self.lora is not None:
            tensors.update({f"lora.{k}": v for k, v in lora_state(self.lora).items()})
            lora_t, meta["lora_opt"] = flatten_optimizer(self.lora_opt, "lopt")
            tensors.update(lora_t)
        return tensors, meta

    def load_state(self, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.field.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("field.")})
        restore_optimizer(self.opt, tensors, meta["opt"])
        self.gen.set_state(tensors["rng"])
        if self.lora is not None:
            load_lora_state(self.lora, {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
            restore_optimizer(self.lora_opt, tensors, meta["lora_opt"], "lopt")
        self.history = list(meta["history"])
        self.step_idx = int(step)


def run(ctx: StageContext) -> None:
    p: TextureParams = ctx.params
    prior = ctx.load_prior()
    emb = load_embeddings(ctx.inputs["encode_prompt"]).to(prior.device, prior.dtype)
    camera = ctx.camera
    field = load_field(ctx.inputs.get("refine", ctx.inputs["coarse"]), ctx.backends.hashgrid)
    field.requires_grad_(True)
    tmesh = load_mesh(ctx.inputs["extract_mesh"])
    verts = torch.as_tensor(tmesh.verts, device=ctx.device)
    faces = torch.as_tensor(tmesh.faces, device=ctx.device)
    raster = ctx.backends.raster
    ctx.backend.update(hashgrid=field.backend.as_dict(), raster=raster.choice.as_dict())
    trainer = TextureTrainer(p, prior, emb, field, verts, faces, raster, camera, ctx.device, ctx.seed)
    run_resumable(ctx, trainer, p.steps, p.checkpoint_every, f"texture ({p.guidance})")
    history = trainer.history

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
    write_mesh(ctx.out, out_mesh, camera, raster, ctx.device, p.preview_frames, p.preview_size)
    (ctx.out / "losses.json").write_text(json.dumps(history))
    write_loss_curve(history, ctx.out / "loss_curve.png")
    ctx.timings["bake_and_preview_s"] = round(time.perf_counter() - started, 3)
    last = history[-min(20, len(history)) :]
    ctx.metrics.update(steps=p.steps, final_loss=round(sum(r["loss"] for r in last) / max(len(last), 1), 6))
    ctx.metrics.update(evaluate_mesh(out_mesh, ctx.prompt, camera, raster=raster, device=ctx.device))


STAGE = Stage(
    name="texture",
    version="2",
    params=TextureParams,
    inputs=("encode_prompt", "coarse", "extract_mesh"),
    optional_inputs=("refine",),
    run=run,
    description="albedo fine-tuned through the rasterizer with SDS or VSD, re-baked into the UV texture",
)
