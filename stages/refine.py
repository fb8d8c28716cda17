"""refine: ProlificDreamer's VSD on the coarse field, with a camera-conditioned LoRA of the prior.

Each particle starts from the coarse field (independent noise streams make them drift apart);
one LoRA, shared by all particles as in the paper, learns the score of their renders online.
Per step: render every particle, update the fields with w(t)(eps_pretrained_cfg - eps_lora), then
train the LoRA on the same renders with the plain diffusion loss (camera dropped 10% of the time).
Writes field.safetensors/field.json (particle 0, the format extract_mesh reads), particle_<i>/
for the others, lora.safetensors, previews and both learning curves.
"""

from __future__ import annotations

import json
import time
from typing import Literal

import torch
from pydantic import Field

from t3d.fields.hashgrid import HashGridBackend
from t3d.fields.nerf import load_field, save_field
from t3d.guidance.perp_neg import F_FS, F_FSB, F_SB, F_SF, ExpDecay, perp_neg_embeddings
from t3d.guidance.sds import CFG_CONVENTION, TRange, Weighting, anneal_t_range, opacity_entropy
from t3d.guidance.vsd import load_lora_state, lora_loss, lora_state, make_lora_branch, vsd_loss
from t3d.optim import flatten_optimizer, restore_optimizer
from t3d.render.cameras import CameraParams, orbit_cameras, sample_cameras, view_names
from t3d.render.previews import render_turntable, write_loss_curve, write_previews
from t3d.render.volume import render
from t3d.stage import (
    Stage,
    StageContext,
    StageParams,
    run_resumable,
    stream_seed,
)
from t3d.stages.encode_prompt import load_embeddings
from t3d.toy.metrics import evaluate_field


class RefineParams(StageParams):
    enabled: bool = Field(False, description="off by default: VSD costs ~2x an SDS step; turn on per flow")
    steps: int = Field(300, ge=1)
    particles: int = Field(1, ge=1, le=8)
    batch_size: int = Field(2, ge=1, description="views per particle per step")
    resolution: int = Field(32, ge=8)
    n_samples: int = Field(48, ge=4)
    guidance_scale: float = Field(
        7.5, gt=0, description="CFG of the pretrained branch (ProlificDreamer: 7.5). " + CFG_CONVENTION
    )
    lora_guidance_scale: float = Field(1.0, gt=0)
    lora_rank: int = Field(4, ge=1)
    lora_lr: float = Field(1e-3, gt=0)
    lora_steps_per_step: int = Field(
        2, ge=1, description="LoRA updates per field update (2: it keeps up with the renders in a 300-step refine)"
    )
    lora_warmup_steps: int = Field(
        100,
        ge=0,
        description=(
            "LoRA steps on the coarse renders before the field moves (a fresh LoRA equals the prior, "
            "so early VSD is a pure CFG push)"
        ),
    )
    camera_dropout: float = Field(0.1, ge=0, le=1)
    lora_prompt: Literal["view", "plain"] = Field(
        "view",
        description=(
            "the LoRA branch's text condition: the per-view prompt (view) or the view-independent one "
            "(plain, threestudio's choice)"
        ),
    )
    perp_neg: bool = Field(
        False, description="Perp-Neg on the pretrained branch: interpolated view prompt, perpendicular negatives"
    )
    perp_neg_f_fs: ExpDecay = Field(F_FS, description="Perp-Neg weight (a, b, c) of a exp(-b r) + c; threestudio's")
    perp_neg_f_sf: ExpDecay = F_SF
    perp_neg_f_sb: ExpDecay = F_SB
    perp_neg_f_fsb: ExpDecay = F_FSB
    lr_grid: float = Field(5e-3, gt=0)
    lr_mlp: float = Field(1e-3, gt=0)
    lr_end_factor: float = Field(
        1.0,
        gt=0,
        le=1,
        description=(
            "field learning rates decay exponentially to this factor by the last step (the LoRA's "
            "stays); 0.1 raised the toy bench's colour error, so none by default"
        ),
    )
    t_range: TRange = (0.02, 0.7)
    t_range_end: TRange | None = (0.02, 0.5)
    weighting: Weighting = "sds"
    grad_clip: float | None = None
    lambda_entropy: float = 1e-3
    shading: Literal["lambertian", "albedo"] = Field(
        "lambertian",
        description="lambertian: the prior was trained on lit images (albedo renders gave higher colour error)",
    )
    ambient: float = Field(0.35, ge=0, le=1)
    checkpoint_every: int = Field(50, ge=1)
    preview_size: int = Field(64, ge=16)
    preview_frames: int = Field(24, ge=4)
    eval_views: int = Field(8, ge=1)

    def key_params(self) -> dict:
        """Leave out the ablation switch at its default and Perp-Neg's weights when it is off."""
        params = super().key_params()
        unused = ["lora_prompt"] if self.lora_prompt == "view" else []
        if not self.perp_neg:
            unused += [k for k in params if k.startswith("perp_neg")]
        return {k: v for k, v in params.items() if k not in unused}


class VSDTrainer:
    def __init__(
        self, p: RefineParams, prior, emb, coarse_folder, camera: CameraParams, hashgrid: HashGridBackend, seed: int
    ):
        self.p, self.prior, self.camera = p, prior, camera
        self.emb = emb.to(prior.device, prior.dtype)
        self.fields = [load_field(coarse_folder, hashgrid) for _ in range(p.particles)]
        groups = []
        for f in self.fields:
            groups += [
                {"params": list(f.encoding.parameters()), "lr": p.lr_grid, "base_lr": p.lr_grid},
                {"params": list(f.mlp.parameters()), "lr": p.lr_mlp, "base_lr": p.lr_mlp},
            ]
        self.field_opt = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)
        self.lora, self.lora_opt = make_lora_branch(prior, p.lora_rank, p.lora_lr, stream_seed(seed, "refine", "lora"))
        self.lr_decay = [(self.field_opt, p.lr_end_factor)]  # the LoRA's learning rate stays
        self.gen = torch.Generator().manual_seed(stream_seed(seed, "refine", "noise"))
        self.step_idx = 0
        self.history: list[dict] = []

    def _render(self, field, cams) -> dict:
        p = self.p
        return render(
            field,
            cams,
            p.resolution,
            n_samples=p.n_samples,
            shading=p.shading,
            ambient=p.ambient,
            perturb=True,
            generator=self.gen,
        )

    def lora_condition(self, names: list[str]) -> torch.Tensor:
        """The LoRA branch's text condition for cameras with these view names."""
        if self.p.lora_prompt == "plain":
            return self.emb.cond.expand(len(names), -1, -1)
        return self.emb.for_views(names)

    def pretrained_condition(self, cams: list, names: list[str]):
        """The pretrained branch's condition: per-view embeddings, or Perp-Neg's positive and terms."""
        p = self.p
        if not p.perp_neg:
            return self.emb.for_views(names), None
        return perp_neg_embeddings(
            self.emb.views,
            torch.cat([c.azimuth for c in cams]),
            [n == "overhead" for n in names],
            p.perp_neg_f_fs,
            p.perp_neg_f_sf,
            p.perp_neg_f_sb,
            p.perp_neg_f_fsb,
        )

    def step(self) -> dict:
        p = self.p
        t0 = time.perf_counter()
        cams = [sample_cameras(self.camera, p.batch_size, self.gen) for _ in self.fields]
        renders = [self._render(f, c) for f, c in zip(self.fields, cams)]
        rgb = torch.cat([r["rgb"] for r in renders])
        c2w = torch.cat([c.c2w for c in cams])
        names = sum((view_names(c, self.camera) for c in cams), [])
        (cond, perp_neg), uncond = self.pretrained_condition(cams, names), self.emb.uncond_batch(len(names))
        lora_cond = self.lora_condition(names)
        t_range = anneal_t_range(self.step_idx, p.steps, p.t_range, p.t_range_end, "linear")
        loss_vsd, x0, info = vsd_loss(
            self.prior,
            self.lora,
            rgb,
            c2w,
            cond,
            uncond,
            guidance_scale=p.guidance_scale,
            lora_guidance_scale=p.lora_guidance_scale,
            t_range=t_range,
            weighting=p.weighting,
            grad_clip=p.grad_clip,
            generator=self.gen,
            lora_cond=lora_cond,
            perp_neg=perp_neg,
        )
        loss = loss_vsd
        if p.lambda_entropy > 0:
            loss = loss + p.lambda_entropy * sum(opacity_entropy(r["opacity"]) for r in renders)
        self.field_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.field_opt.step()
        t1 = time.perf_counter()
        lora_losses = []
        for _ in range(p.lora_steps_per_step):
            l_lora = lora_loss(
                self.prior, self.lora, x0, c2w, lora_cond, camera_dropout=p.camera_dropout, generator=self.gen
            )
            self.lora_opt.zero_grad(set_to_none=True)
            l_lora.backward()
            self.lora_opt.step()
            lora_losses.append(float(l_lora.detach()))
        t2 = time.perf_counter()
        record = {
            "step": self.step_idx,
            "loss": float(loss.detach()),
            "lora_loss": sum(lora_losses) / len(lora_losses),
            "grad_norm": info["grad_norm"],
            "opacity": float(torch.cat([r["opacity"] for r in renders]).detach().mean()),
        }
        self.history.append(record)
        self.step_idx += 1
        return {**record, "field_step_s": t1 - t0, "lora_step_s": t2 - t1, "step_s": t2 - t0}

    def warm_up_lora(self, steps: int, update=None) -> list[float]:
        """Fit the LoRA to the particles' current renders (no field update)."""
        p = self.p
        losses = []
        for _ in range(steps):
            cams = [sample_cameras(self.camera, p.batch_size, self.gen) for _ in self.fields]
            with torch.no_grad():
                rgb = torch.cat([self._render(f, c)["rgb"] for f, c in zip(self.fields, cams)])
                x0 = self.prior.images_to_model(rgb).float()
            c2w = torch.cat([c.c2w for c in cams])
            names = sum((view_names(c, self.camera) for c in cams), [])
            l_lora = lora_loss(
                self.prior,
                self.lora,
                x0,
                c2w,
                self.lora_condition(names),
                camera_dropout=p.camera_dropout,
                generator=self.gen,
            )
            self.lora_opt.zero_grad(set_to_none=True)
            l_lora.backward()
            self.lora_opt.step()
            losses.append(float(l_lora.detach()))
            if update is not None:
                update(1, lora=losses[-1])
        return losses

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors: dict[str, torch.Tensor] = {}
        for i, f in enumerate(self.fields):
            tensors.update({f"field{i}.{k}": v for k, v in f.state_dict().items()})
        tensors.update({f"lora.{k}": v for k, v in lora_state(self.lora).items()})
        t_field, m_field = flatten_optimizer(self.field_opt, "fopt")
        t_lora, m_lora = flatten_optimizer(self.lora_opt, "lopt")
        tensors.update(t_field)
        tensors.update(t_lora)
        tensors["rng"] = self.gen.get_state()
        return tensors, {"field_opt": m_field, "lora_opt": m_lora, "history": self.history}

    def load_state(self, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        for i, f in enumerate(self.fields):
            f.load_state_dict({k[len(f"field{i}.") :]: v for k, v in tensors.items() if k.startswith(f"field{i}.")})
        load_lora_state(self.lora, {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
        restore_optimizer(self.field_opt, tensors, meta["field_opt"], "fopt")
        restore_optimizer(self.lora_opt, tensors, meta["lora_opt"], "lopt")
        self.gen.set_state(tensors["rng"])
        self.history = list(meta.get("history", []))
        self.step_idx = int(step)


@torch.no_grad()
def particle_distance(fields, camera: CameraParams, size: int = 32, n_views: int = 4) -> float:
    """Mean absolute pixel difference between particles' renders of the same views (0 = identical)."""
    if len(fields) < 2:
        return 0.0
    cams = orbit_cameras(camera, n_views, elevation_deg=15.0)
    imgs = [render(f, cams, size, n_samples=64, shading="albedo")["rgb"] for f in fields]
    pairs = [(a, b) for i, a in enumerate(imgs) for b in imgs[i + 1 :]]
    return float(sum((a - b).abs().mean() for a, b in pairs) / len(pairs))


def run(ctx: StageContext) -> None:
    from safetensors.torch import save_file

    p: RefineParams = ctx.params
    prior = ctx.load_prior()
    emb = load_embeddings(ctx.inputs["encode_prompt"])
    camera = ctx.camera
    torch.manual_seed(ctx.stream_seed("torch"))  # anything unseeded still repeats
    trainer = VSDTrainer(p, prior, emb, ctx.inputs["coarse"], camera, ctx.backends.hashgrid, ctx.seed)
    ctx.backend["hashgrid"] = trainer.fields[0].backend.as_dict()

    def warm_up_lora() -> None:
        started = time.perf_counter()
        with ctx.progress(p.lora_warmup_steps, "refine: LoRA warm-up") as update:
            warm = trainer.warm_up_lora(p.lora_warmup_steps, update)
        ctx.timings["lora_warmup_s"] = round(time.perf_counter() - started, 3)
        ctx.metrics["lora_warmup_loss"] = round(sum(warm[-10:]) / len(warm[-10:]), 5)

    label = f"refine (VSD, {p.particles} particle{'s' if p.particles > 1 else ''})"
    split = {"field_step_s": 0.0, "lora_step_s": 0.0}

    def postfix(rec: dict) -> dict:
        for k in split:
            split[k] += rec[k]
        return {"loss": rec["loss"], "lora": rec["lora_loss"]}

    warm_up = warm_up_lora if p.lora_warmup_steps else None
    run_resumable(ctx, trainer, p.steps, p.checkpoint_every, label, postfix, fresh_start=warm_up)
    ctx.timings.update({k: round(v, 3) for k, v in split.items()})

    for i, field in enumerate(trainer.fields):
        folder = ctx.out if i == 0 else ctx.out / f"particle_{i}"
        folder.mkdir(exist_ok=True)
        save_field(field, folder)
        write_previews(render_turntable(field, camera, p.preview_frames, p.preview_size, ambient=p.ambient), folder)
        ctx.metrics.update(
            {f"particle{i}.{k}": v for k, v in evaluate_field(field, ctx.prompt, camera, n_views=p.eval_views).items()}
        )
    save_file({k: v.contiguous().cpu() for k, v in lora_state(trainer.lora).items()}, str(ctx.out / "lora.safetensors"))
    (ctx.out / "losses.json").write_text(json.dumps(trainer.history))
    write_loss_curve(trainer.history, ctx.out / "loss_curve.png")
    write_loss_curve(trainer.history, ctx.out / "lora_loss_curve.png", key="lora_loss")
    for key in ("iou", "color_err"):
        if f"particle0.{key}" in ctx.metrics:
            ctx.metrics[key] = ctx.metrics[f"particle0.{key}"]
    ctx.metrics["particle_pixel_distance"] = round(particle_distance(trainer.fields, camera), 5)
    ctx.metrics["steps"] = p.steps


STAGE = Stage(
    name="refine",
    version="2",
    params=RefineParams,
    inputs=("encode_prompt", "coarse"),
    run=run,
    description="VSD with a camera-conditioned LoRA (ProlificDreamer), from the coarse field",
)
