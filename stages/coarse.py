"""coarse: optimise a hash-grid NeRF against the prior with SDS (DreamFusion) or SJC.

Reads the prompt embeddings of encode_prompt, samples cameras from the flow's camera
distribution (the one the toy prior was trained on), renders, scores the renders with the prior
and steps Adam. Checkpoints every `checkpoint_every` steps (field, optimizer, RNG, loss history)
so a killed run resumes where it stopped. Writes:
  field.safetensors + field.json   the field's weights and FieldParams (t3d.fields.nerf.load_field)
  turntable.png / turntable.gif    preview strip and animation
  loss_curve.png + losses.json     the optimisation trace
For toy-world prompts ("a red cube") it also measures silhouette IoU and foreground colour error
against the true primitive from held-out orbit views (metrics iou / color_err).
"""

from __future__ import annotations

import json
import random
import time
from typing import Literal

import torch
from pydantic import Field

from t3d.fields.hashgrid import HashGridBackend
from t3d.fields.nerf import FieldParams, NeRFField, save_field
from t3d.guidance.perp_neg import F_FS, F_FSB, F_SB, F_SF, ExpDecay, perp_neg_embeddings
from t3d.guidance.sds import (
    CFG_CONVENTION,
    TRange,
    Weighting,
    anneal_t_range,
    guidance_loss,
    opacity_entropy,
    opacity_sparsity,
    orientation_loss,
)
from t3d.optim import flatten_optimizer, restore_optimizer
from t3d.render.cameras import CameraParams, sample_cameras, view_names
from t3d.render.previews import render_turntable, write_loss_curve, write_previews
from t3d.render.volume import OccupancyGrid, render
from t3d.stage import (
    Stage,
    StageContext,
    StageParams,
    run_resumable,
    stream_seed,
)
from t3d.stages.encode_prompt import load_embeddings
from t3d.toy.metrics import evaluate_field


def _default_field() -> FieldParams:
    return FieldParams(bound=0.9, blob_density=5.0, blob_radius=0.4)


class CoarseParams(StageParams):
    guidance: Literal["sds", "sjc"] = Field("sds", description="the score distillation method: SDS or SJC (PAAS)")
    steps: int = Field(400, ge=1)
    batch_size: int = Field(4, ge=1)
    resolution: int = Field(32, ge=8, description="render size; the prior resizes to its own")
    n_samples: int = Field(48, ge=4, description="samples per ray")
    lr_grid: float = Field(1e-2, gt=0)
    lr_mlp: float = Field(3e-3, gt=0)
    lr_bg: float = Field(1e-3, gt=0)
    lr_end_factor: float = Field(
        0.1, gt=0, le=1, description="learning rates decay exponentially to this factor by the last step"
    )
    guidance_scale: float | None = Field(
        7.5,
        description=(
            "CFG scale for the score; None: the prior's sampling default (7.5 for the toy prior). SD wants ~100. "
        )
        + CFG_CONVENTION,
    )
    t_range: TRange = (0.02, 0.98)
    t_range_end: TRange | None = Field((0.02, 0.6), description="annealed to this by the last step; None: fixed")
    t_anneal: Literal["linear", "sqrt", "none"] = "linear"
    weighting: Weighting = Field("sds", description="SDS's w(t); SJC has none")
    grad_clip: float | None = None
    sjc_n_noise: int = Field(1, ge=1, description="SJC: noise draws averaged per score (PAAS)")
    sjc_var_red: bool = True
    sds_noise_baseline: bool = Field(
        True, description="SDS: subtract the injected noise (False: DreamFusion's ablation, grad = w(t) eps_hat)"
    )
    sjc_perturb: bool = Field(
        True,
        description="SJC: score noised copies (PAAS); False scores the clean render (the out-of-distribution case)",
    )
    perp_neg: bool = Field(
        False, description="Perp-Neg: azimuth-interpolated view prompt, front/side negatives pushed perpendicularly"
    )
    perp_neg_f_fs: ExpDecay = Field(F_FS, description="Perp-Neg weight (a, b, c) of a exp(-b r) + c; threestudio's")
    perp_neg_f_sf: ExpDecay = F_SF
    perp_neg_f_sb: ExpDecay = F_SB
    perp_neg_f_fsb: ExpDecay = F_FSB
    albedo_warmup: float = Field(0.1, ge=0, le=1, description="fraction of steps rendered with albedo shading only")
    shading: Literal["lambertian", "albedo"] = "lambertian"
    textureless_prob: float = Field(0.0, ge=0, le=1)
    albedo_prob: float = Field(0.0, ge=0, le=1)
    random_light: bool = False
    light_jitter: float = 0.3
    ambient: float = Field(0.35, ge=0, le=1)
    normal_mode: Literal["surface", "sample"] = "surface"
    lambda_orient: float = 0.0
    lambda_sparsity: float = 0.0
    lambda_entropy: float = Field(10.0, description="opacity entropy (mean over pixels): crisp silhouettes")
    occupancy_res: int = Field(32, ge=0, description="occupancy grid cells per side for empty-space skipping; 0: off")
    occupancy_every: int = Field(8, ge=1)
    occupancy_alpha: float = Field(
        0.01,
        ge=0,
        description=(
            "a cell is empty while one sample there stays below this opacity, sigma * (2 bound / n_samples) "
            "(nerfacc's occ_thre 0.01 on density x step): its samples are skipped"
        ),
    )
    field: FieldParams = Field(default_factory=_default_field)
    checkpoint_every: int = Field(100, ge=1)
    preview_size: int = Field(64, ge=16)
    preview_frames: int = Field(24, ge=4)
    eval_views: int = Field(8, ge=1)

    def key_params(self) -> dict:
        """Leave out what changes nothing: the options of the guidance method not chosen
        (guidance_loss drops them), ablation switches left at their defaults, Perp-Neg's weights
        when it is off and, without a learned background, its MLP's size and rate."""
        params = super().key_params()
        if self.guidance == "sds":
            unused = ["sjc_n_noise", "sjc_var_red", "sjc_perturb"]
        else:
            unused = ["weighting", "sds_noise_baseline"]
        unused += [k for k in ("sds_noise_baseline", "sjc_perturb") if getattr(self, k)]
        if not self.perp_neg:
            unused += [k for k in params if k.startswith("perp_neg")]
        if self.field.background != "learned":
            unused.append("lr_bg")
            del params["field"]["bg_hidden"]
        return {k: v for k, v in params.items() if k not in unused}


# ---- the optimisation loop (also used by bench/sds_step.py) --------------------------------
class CoarseTrainer:
    """One SDS/SJC step at a time on a NeRFField; knows how to save and restore itself."""

    def __init__(
        self, params: CoarseParams, prior, embeddings, camera: CameraParams, hashgrid: HashGridBackend, seed: int = 0
    ):
        self.p = params
        self.prior = prior
        self.emb = embeddings.to(prior.device, prior.dtype)
        self.camera = camera
        self.device = hashgrid.device
        self.field = NeRFField(params.field, hashgrid, seed=stream_seed(seed, "coarse", "field"))
        groups = [
            {
                "params": list(self.field.encoding.parameters()),
                "lr": params.lr_grid,
                "base_lr": params.lr_grid,
                "name": "grid",
            },
            {"params": list(self.field.mlp.parameters()), "lr": params.lr_mlp, "base_lr": params.lr_mlp, "name": "mlp"},
        ]
        if self.field.bg_mlp is not None:
            groups.append(
                {
                    "params": list(self.field.bg_mlp.parameters()),
                    "lr": params.lr_bg,
                    "base_lr": params.lr_bg,
                    "name": "bg",
                }
            )
        self.opt = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)
        self.occupancy = (
            OccupancyGrid(
                params.field.bound,
                params.occupancy_res,
                params.occupancy_alpha * params.n_samples / (2 * params.field.bound),  # opacity -> density
                device=self.device,
            )
            if params.occupancy_res > 0
            else None
        )
        self.lr_decay = [(self.opt, params.lr_end_factor)]
        self.gen = torch.Generator().manual_seed(stream_seed(seed, "coarse", "noise"))
        self.rand = random.Random(stream_seed(seed, "coarse", "shading"))
        self.step_idx = 0
        self.history: list[dict] = []

    def shading_at(self, step: int) -> str:
        if step < self.p.albedo_warmup * self.p.steps or self.p.shading == "albedo":
            return "albedo"
        u = self.rand.random()
        if u < self.p.textureless_prob:
            return "textureless"
        if u < self.p.textureless_prob + self.p.albedo_prob:
            return "albedo"
        return "lambertian"

    def step(self) -> dict:
        p = self.p
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        if self.occupancy is not None and self.step_idx % p.occupancy_every == 0:
            self.occupancy.update(self.field, self.gen)
        cams = sample_cameras(self.camera, p.batch_size, self.gen)
        names = view_names(cams, self.camera)
        uncond = self.emb.uncond_batch(p.batch_size)
        perp_neg = None
        if p.perp_neg:
            cond, perp_neg = perp_neg_embeddings(
                self.emb.views,
                cams.azimuth,
                [n == "overhead" for n in names],
                p.perp_neg_f_fs,
                p.perp_neg_f_sf,
                p.perp_neg_f_sb,
                p.perp_neg_f_fsb,
            )
        else:
            cond = self.emb.for_views(names)
        shading = self.shading_at(self.step_idx)
        out = render(
            self.field,
            cams,
            p.resolution,
            n_samples=p.n_samples,
            shading=shading,
            random_light=p.random_light,
            light_jitter=p.light_jitter,
            ambient=p.ambient,
            perturb=True,
            generator=self.gen,
            compute_normals=p.lambda_orient > 0,
            normal_mode=p.normal_mode,
            occupancy=self.occupancy,
        )
        sync()
        t1 = time.perf_counter()
        t_range = anneal_t_range(self.step_idx, p.steps, p.t_range, p.t_range_end, p.t_anneal)
        loss_g, info = guidance_loss(
            p.guidance,
            self.prior,
            out["rgb"],
            cond,
            uncond,
            guidance_scale=p.guidance_scale,
            t_range=t_range,
            weighting=p.weighting,
            grad_clip=p.grad_clip,
            generator=self.gen,
            n_noise=p.sjc_n_noise,
            var_red=p.sjc_var_red,
            noise_baseline=p.sds_noise_baseline,
            perturb=p.sjc_perturb,
            perp_neg=perp_neg,
        )
        loss = loss_g
        terms = {"guidance": float(loss_g.detach())}
        if p.lambda_orient > 0 and out["orient_weights"] is not None:
            orient = orientation_loss(
                out["orient_weights"], out["orient_normals"], out["ray_dirs"], n_rays=out["opacity"].numel()
            )
            loss = loss + p.lambda_orient * orient
            terms["orient"] = float(orient.detach())
        if p.lambda_sparsity > 0:
            sparse = opacity_sparsity(out["opacity"])
            loss = loss + p.lambda_sparsity * sparse
            terms["sparsity"] = float(sparse.detach())
        if p.lambda_entropy > 0:
            ent = opacity_entropy(out["opacity"])
            loss = loss + p.lambda_entropy * ent
            terms["entropy"] = float(ent.detach())
        sync()
        t2 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        t3 = time.perf_counter()
        self.opt.step()
        sync()
        t4 = time.perf_counter()
        record = {
            "step": self.step_idx,
            "loss": float(loss.detach()),
            **terms,
            "grad_norm": info["grad_norm"],
            "t_mean": float(info["t"].float().mean()),
            "opacity": float(out["opacity"].detach().mean()),
            "occupied": self.occupancy.fraction() if self.occupancy is not None else 1.0,
            "shading": shading,
        }
        self.history.append(record)
        self.step_idx += 1
        return {
            **record,
            "render_s": t1 - t0,
            "prior_forward_s": t2 - t1,
            "backward_s": t3 - t2,
            "optimizer_s": t4 - t3,
            "step_s": t4 - t0,
        }

    # ---- checkpoints ------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"field.{k}": v for k, v in self.field.state_dict().items()}
        opt_t, opt_meta = flatten_optimizer(self.opt)
        tensors.update(opt_t)
        tensors["rng"] = self.gen.get_state()
        if self.occupancy is not None:
            tensors.update({f"occupancy.{k}": v for k, v in self.occupancy.state_dict().items()})
        meta = {"optimizer": opt_meta, "history": self.history, "py_rng": _jsonable_random_state(self.rand.getstate())}
        return tensors, meta

    def load_state(self, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.field.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("field.")})
        restore_optimizer(self.opt, {k: v.to(self.device) for k, v in tensors.items()}, meta["optimizer"])
        self.gen.set_state(tensors["rng"])
        if self.occupancy is not None and "occupancy.grid" in tensors:
            self.occupancy.load_state_dict({"density": tensors["occupancy.density"], "grid": tensors["occupancy.grid"]})
        self.rand.setstate(_tuple_random_state(meta["py_rng"]))
        self.history = list(meta.get("history", []))
        self.step_idx = int(step)


def _jsonable_random_state(state):
    return [state[0], list(state[1]), state[2]]


def _tuple_random_state(state):
    return (state[0], tuple(state[1]), state[2])


# ---- the stage -----------------------------------------------------------------------------
def run(ctx: StageContext) -> None:
    p: CoarseParams = ctx.params
    prior = ctx.load_prior()
    emb = load_embeddings(ctx.inputs["encode_prompt"])
    camera = ctx.camera
    torch.manual_seed(ctx.stream_seed("torch"))  # anything unseeded still repeats
    trainer = CoarseTrainer(p, prior, emb, camera, ctx.backends.hashgrid, seed=ctx.seed)
    ctx.backend["hashgrid"] = trainer.field.backend.as_dict()
    ctx.backend["renderer"] = "torch-volume"
    split = {"render_s": 0.0, "prior_forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0}

    def postfix(rec: dict) -> dict:
        for k in split:
            split[k] += rec[k]
        return {"loss": rec["loss"], "opacity": rec["opacity"]}

    run_resumable(ctx, trainer, p.steps, p.checkpoint_every, f"coarse ({p.guidance})", postfix)
    ctx.timings.update({k: round(v, 3) for k, v in split.items()})

    save_field(trainer.field, ctx.out)
    started = time.perf_counter()
    frames = render_turntable(trainer.field, camera, p.preview_frames, p.preview_size, ambient=p.ambient)
    write_previews(frames, ctx.out)
    write_loss_curve(trainer.history, ctx.out / "loss_curve.png")
    (ctx.out / "losses.json").write_text(json.dumps(trainer.history))
    ctx.timings["preview_s"] = round(time.perf_counter() - started, 3)
    metrics = evaluate_field(trainer.field, ctx.prompt, camera, n_views=p.eval_views)
    last = trainer.history[-min(20, len(trainer.history)) :]
    ctx.metrics.update(
        {
            "steps": p.steps,
            "final_loss": round(sum(r["loss"] for r in last) / max(len(last), 1), 6),
            "final_opacity": round(last[-1]["opacity"], 4) if last else None,
            **metrics,
        }
    )


STAGE = Stage(
    name="coarse",
    version="2",
    params=CoarseParams,
    inputs=("encode_prompt",),
    run=run,
    description="hash-grid NeRF optimised against the prior with SDS or SJC",
)
