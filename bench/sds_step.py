"""Seconds per coarse-stage optimisation step, split into render / prior forward / backward / optimizer.

Default: CPU, the embedded toy prior (or the tiny random prior when the toy prior is not trained
yet), the coarse stage's default resolution, batch and samples, for SDS and SJC.
--sd21: on CUDA only, an SD-2.1-sized UNet (random weights, fp16, 64x64 latents from 512 px via an
SD-sized VAE) behind the same DiffusionPrior interface, rendering 64 px like DreamFusion/threestudio.
VSD (the refine stage: field step + LoRA step) is timed at the same settings; vsd_over_sds is the
ratio of whole steps (goal <= 2.5). Method vsd1 is VSD with one LoRA update per step (the refine
stage's default is 2; ProlificDreamer makes 1), reported as vsd1_over_sds.
--dtype fp16 (default) or fp32 sets the SD-sized prior's precision (the toy prior is always fp32).
On CUDA each method also reports its it/s (1 / median step) and peak_mem_mib, the peak of
torch.cuda.max_memory_allocated over its warm-up and timed steps (reset before each method).
--dry-run parses the arguments and, with --sd21, builds the SD-2.1-sized UNet and VAE on the meta
device (no memory, no CUDA) to print their parameter counts; then exits.
Last output line: one JSON object {"sds": {...}, "sjc": {...}, "vsd": {...}, "vsd_over_sds", "device", "config"}.
Usage: python bench/sds_step.py [--steps 5] [--warmup 2] [--methods sds,sjc,vsd] [--sd21]
                                [--dtype fp16|fp32] [--threads N] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from t3d.fields.hashgrid import INSTANT_NGP_CONFIG, choose_hashgrid
from t3d.render.cameras import VIEW_SUFFIXES, CameraParams
from t3d.stages.coarse import CoarseParams, CoarseTrainer
from t3d.stages.encode_prompt import PromptEmbeddings

SPLIT = ("render_s", "prior_forward_s", "backward_s", "optimizer_s", "step_s")


def toy_setup(prompt: str):
    from t3d.priors import PriorNotFoundError, build_tiny_prior, load_prior

    try:
        prior, name = load_prior("embedded"), "embedded"
    except PriorNotFoundError:
        prior, name = build_tiny_prior("pixel", seed=0, image_size=32), "tiny-pixel (embedded prior not trained yet)"
    texts = {"cond": prompt, "uncond": ""}
    texts.update({f"view.{v}": prompt + suffix for v, suffix in VIEW_SUFFIXES.items()})
    emb = prior.encode_text(list(texts.values())).float()
    named = dict(zip(texts, emb.split(1)))
    embeddings = PromptEmbeddings(
        named["cond"], named["uncond"], {k[5:]: v for k, v in named.items() if k.startswith("view.")}, texts
    )
    return prior, name, embeddings, CoarseParams()


DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def sd21_models(device: torch.device | str):
    """SD 2.1's UNet and VAE (the 512 px base model's config, t3d.priors.configs), random weights, built on `device`."""
    from t3d.priors.configs import sd21_unet, sd21_vae

    try:
        with torch.device(device):  # built in place: no 3.5 GB of CPU init and copy
            unet, vae = sd21_unet(), sd21_vae()
    except Exception as exc:  # a diffusers version that pins a device inside __init__
        print(f"building on {device} failed ({type(exc).__name__}: {exc}); building on the CPU", flush=True)
        unet, vae = sd21_unet(), sd21_vae()
    return unet, vae


def n_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sd21_setup(dtype_name: str = "fp16"):
    """SD 2.1 sizes from config, random weights: for timings only."""
    from t3d.fields.nerf import FieldParams
    from t3d.priors import DiffusionPrior
    from t3d.priors.configs import sd21_scheduler

    if not torch.cuda.is_available():
        raise SystemExit("--sd21 needs CUDA (an SD-sized UNet step on 2 CPU cores takes minutes)")
    device, dtype = torch.device("cuda"), DTYPES[dtype_name]
    unet, vae = sd21_models(device)
    for m in (unet, vae):
        m.to(device, dtype).eval().requires_grad_(False)
    sched = sd21_scheduler()
    prior = DiffusionPrior(
        identity="sd21-sized-random",
        space="latent",
        image_size=512,
        tokenizer=None,
        text_encoder=torch.nn.Identity(),
        unet=unet,
        scheduler=sched,
        vae=vae,
        device=device,
        dtype=dtype,
        default_guidance_scale=100.0,
    )
    gen = torch.Generator().manual_seed(0)
    rand = lambda: torch.randn(1, 77, 1024, generator=gen)  # noqa: E731
    embeddings = PromptEmbeddings(rand(), rand(), {v: rand() for v in VIEW_SUFFIXES}, {})
    gpu_grid = INSTANT_NGP_CONFIG
    params = CoarseParams(resolution=64, batch_size=1, n_samples=64, field=FieldParams(grid=gpu_grid, bound=1.0))
    return prior, f"sd21-sized (random weights, {dtype_name})", embeddings, params


def vsd_timing(prior, embeddings, params, hashgrid, warmup: int, steps: int, lora_steps: int | None = None) -> dict:
    """One VSD step (field update + LoRA update) at the coarse stage's render settings."""
    import tempfile
    from pathlib import Path

    from t3d.fields.nerf import NeRFField, save_field
    from t3d.stages.refine import RefineParams, VSDTrainer

    with tempfile.TemporaryDirectory() as tmp:
        save_field(NeRFField(params.field, hashgrid), Path(tmp))
        rp = RefineParams(
            steps=10_000, batch_size=params.batch_size, resolution=params.resolution, n_samples=params.n_samples
        )
        if lora_steps is not None:
            rp = rp.model_copy(update={"lora_steps_per_step": lora_steps})
        trainer = VSDTrainer(rp, prior, embeddings, Path(tmp), CameraParams(), hashgrid, seed=0)
        for _ in range(warmup):
            trainer.step()
        recs = [trainer.step() for _ in range(steps)]
    return {k: round(statistics.median(r[k] for r in recs), 4) for k in ("field_step_s", "lora_step_s", "step_s")}


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--methods", default="sds,sjc,vsd")
    ap.add_argument("--sd21", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt", default="a red sphere")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="precision of the SD-sized prior (--sd21)")
    ap.add_argument(
        "--compute",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a flow.yaml compute: option for the prior, e.g. profile=low-memory (repeatable)",
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="check the arguments (and the SD-2.1 sizes on the meta device), then exit",
    )
    return ap


def compute_params(pairs: list[str]):
    """--compute KEY=VALUE ... -> the ComputeParams a flow's `compute:` block would give."""
    import yaml

    from t3d.priors.compute import ComputeParams

    data = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--compute {pair!r}: expected KEY=VALUE, e.g. profile=low-memory")
        data[key.strip()] = yaml.safe_load(value)
    return ComputeParams.model_validate(data)


def dry_run(args) -> dict:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - {"sds", "sjc", "vsd", "vsd1"})
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}: use sds, sjc, vsd, vsd1")
    out = {
        "dry_run": True,
        "methods": methods,
        "sd21": args.sd21,
        "dtype": args.dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "compute": compute_params(args.compute).model_dump(),
    }
    if args.sd21:
        unet, vae = sd21_models("meta")
        out.update(
            unet_params=n_parameters(unet), vae_params=n_parameters(vae), unet_sample_size=unet.config.sample_size
        )
    print(json.dumps(out))
    return out


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    compute = compute_params(args.compute)
    prior, prior_name, embeddings, params = sd21_setup(args.dtype) if args.sd21 else toy_setup(args.prompt)
    if args.compute:
        from t3d.priors.compute import apply_compute

        apply_compute(prior, compute)
    device = prior.device
    hashgrid = choose_hashgrid("auto", device)  # tinycudann where its smoke op passes, as a run's `backends:` auto
    result: dict = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        reset_peak(device)
        if method in ("vsd", "vsd1"):
            result[method] = vsd_timing(
                prior, embeddings, params, hashgrid, args.warmup, args.steps, 1 if method == "vsd1" else None
            )
        else:
            p = params.model_copy(update={"guidance": method, "albedo_warmup": 0.0, "steps": 10_000})
            trainer = CoarseTrainer(p, prior, embeddings, CameraParams(), hashgrid, seed=0)
            for _ in range(args.warmup):
                trainer.step()
            recs = [trainer.step() for _ in range(args.steps)]
            result[method] = {k: round(statistics.median(r[k] for r in recs), 4) for k in SPLIT}
            result[method]["hashgrid_backend"] = trainer.field.backend.backend
            del trainer
        result[method]["it_per_s"] = round(1.0 / result[method]["step_s"], 2) if result[method]["step_s"] > 0 else None
        result[method]["peak_mem_mib"] = peak_mib(device)
        print(f"{method}: " + "  ".join(f"{k}={v}" for k, v in result[method].items()), flush=True)
    for m in ("vsd", "vsd1"):
        if m in result and "sds" in result:
            result[f"{m}_over_sds"] = round(result[m]["step_s"] / result["sds"]["step_s"], 3)
    result["device"] = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )
    result["config"] = {
        "prior": prior_name,
        "resolution": params.resolution,
        "batch_size": params.batch_size,
        "n_samples": params.n_samples,
        "shading": params.shading,
        "normal_mode": params.normal_mode,
        "grid": params.field.grid,
        "dtype": str(prior.dtype).replace("torch.", ""),
        "compute": getattr(prior, "compute", None) or "default",
        "steps_timed": args.steps,
        "statistic": "median",
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
