"""The whole flow at full prior size on this CPU: SD 2.1 and a DeepFloyd IF stage I (M) sized prior.

For each prior (random weights, built from t3d.priors.configs, nothing downloaded) the bench
1. builds it in a child process and saves it as a diffusers folder (safetensors) under --workdir
   (default: a new folder in the system temp dir, deleted at the end unless --keep);
2. writes a flow YAML with `prior: <that folder>`, `device: cpu`, a store next to it, and
   --steps steps per stage (batch 1) at the prior's real sizes;
3. runs `t3d run FLOW --no-prefect` in a child process (T3D_TORCH_THREADS=--threads) and measures
   its peak RSS (wait4's ru_maxrss) and, by sampling /proc, the peak RSS while each stage ran;
4. reads every stage's seconds and per-step split from the manifests in the store.

Sizes. SD 2.1 (512 px base model): UNet 865.9M, VAE 83.7M, OpenCLIP ViT-H/14 text tower 340.4M
(CLIPTextModel, 23 layers, vocab 49,408 from a generated BPE vocabulary), 77 tokens, 64x64x4
latents. The NeRF and the rasterizer render 64 px and the prior's images_to_model upsamples to 512
(bilinear) before the VAE encoder, as threestudio's DreamFusion-SD does; the SDS gradient flows
back through the VAE encoder at 512 px. IF: a 371.6M pixel UNet (IF-I-M's layout, see
t3d.priors.configs) at 64 px, no VAE; its T5 text encoder has T5-XXL's widths (d_model 4096,
d_ff 10240, 64 heads, vocab 32,128) but only --t5-layers of its 24 layers (default 2), because the
whole T5-XXL encoder is 4.76B parameters = 17.7 GiB in fp32: that alone exceeds this bench's
12 GiB memory budget on a 24 GiB machine (t3d loads priors in fp32 on a CPU). The JSON says so.

Stages: encode_prompt, coarse (SDS, CFG 100), refine (VSD with its camera-conditioned LoRA, 1 LoRA
warm-up step, 2 LoRA updates per step; --no-refine drops it), extract_mesh (with --steps steps of
geometry refinement), texture (SDS), export. Previews and evaluations run at the stages' defaults.

--dry-run builds every component on the meta device (no memory, nothing saved or run), checks the
parameter counts against t3d.priors.configs.EXPECTED_PARAMS and prints them: seconds.
Last output line: one JSON object {"sd21": {...}, "if": {...}} (or {"dry_run": ...}).
Usage: python bench/full_size.py [--which sd21,if] [--steps 2] [--threads 1] [--t5-layers 2]
       [--no-refine] [--workdir DIR] [--keep] [--timeout 1800] [--dry-run]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
KINDS = ("sd21", "if")
GIB = 2**30
T5_XXL_LAYERS = 24


# ---- building the priors ------------------------------------------------------------------------


def component_makers(kind: str, t5_layers: int) -> list[tuple[str, object]]:
    """(name, zero-argument builder) per pipeline component, in the order they are built."""
    from t3d.priors import configs as C

    if kind == "sd21":
        return [
            ("tokenizer", C.synthetic_clip_tokenizer),
            ("text_encoder", C.sd21_text_encoder),
            ("unet", C.sd21_unet),
            ("vae", C.sd21_vae),
            ("scheduler", C.sd21_scheduler),
        ]
    if kind == "if":
        return [
            ("tokenizer", C.synthetic_t5_tokenizer),
            ("text_encoder", lambda: C.t5_xxl_encoder(t5_layers)),
            ("unet", C.if_m_unet),
            ("scheduler", C.if_scheduler),
        ]
    raise ValueError(f"unknown prior kind {kind!r}: use {', '.join(KINDS)}")


def build_prior_folder(kind: str, folder: Path, t5_layers: int = 2, seed: int = 0) -> dict:
    """Build each component with random weights, save it (safetensors) and free it before the next."""
    from t3d.priors.configs import n_parameters, save_component, write_model_index

    folder.mkdir(parents=True, exist_ok=True)
    entries, params, seconds, extra = {}, {}, {}, {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, make in component_makers(kind, t5_layers):
            t0 = time.perf_counter()
            obj = make()
            if isinstance(obj, torch.nn.Module):
                obj.eval()
                params[name] = n_parameters(obj)
            t1 = time.perf_counter()
            if kind == "if" and name == "text_encoder":
                encode_s = _time_encode(obj)
                extra["t5_encode"] = {
                    "layers": t5_layers,
                    "texts": 6,
                    "tokens": 77,
                    "s": round(encode_s, 2),
                    "s_per_layer": round(encode_s / t5_layers, 3),
                }
                t1 = time.perf_counter()
            entries[name] = save_component(folder, name, obj)
            seconds[name] = {"build_s": round(t1 - t0, 2), "save_s": round(time.perf_counter() - t1, 2)}
            del obj
            gc.collect()
    write_model_index(folder, entries, "if" if kind == "if" else "sd")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"params": params, "seconds": seconds, "folder_gib": round(size / GIB, 3), **extra}


@torch.no_grad()
def _time_encode(encoder: torch.nn.Module, texts: int = 6, tokens: int = 77) -> float:
    """Seconds for one encode of encode_prompt's batch (prompt, negative, 4 views) at full length."""
    ids = torch.randint(0, 32000, (texts, tokens), generator=torch.Generator().manual_seed(0))
    encoder(ids)  # warm-up
    t0 = time.perf_counter()
    encoder(ids)
    return time.perf_counter() - t0


def dry_run(kinds: list[str], t5_layers: int) -> dict:
    """Every component on the meta device: parameter counts, checked; nothing allocated or saved."""
    from t3d.priors import configs as C

    expected = C.EXPECTED_PARAMS
    out: dict = {"dry_run": True, "params": {}, "expected": {}, "ok": True}
    with torch.device("meta"):
        for kind in kinds:
            prefix = "sd21" if kind == "sd21" else "if_m"
            for name, make in component_makers(kind, t5_layers):
                if name in ("tokenizer", "scheduler"):
                    continue
                out["params"][f"{prefix}.{name}"] = C.n_parameters(make())
            if kind == "if":  # the real encoder is 24 layers; the run uses t5_layers of them
                full = C.n_parameters(C.t5_xxl_encoder())
                out["params"]["if_m.text_encoder_full"] = full
                out["if_t5"] = {
                    "layers_run": t5_layers,
                    "layers_real": T5_XXL_LAYERS,
                    "params_real": full,
                    "fp32_gib_real": round(full * 4 / GIB, 2),
                }
    for key, n in out["params"].items():
        want = expected.get("if_m.text_encoder" if key == "if_m.text_encoder_full" else key)
        if key == "if_m.text_encoder" and t5_layers != T5_XXL_LAYERS:
            want = expected["if_m.text_encoder"] - (T5_XXL_LAYERS - t5_layers) * C.t5_layer_params()
        out["expected"][key] = want
        out["ok"] = out["ok"] and n == want
    return out


# ---- the flow ------------------------------------------------------------------------------------


def flow_yaml(kind: str, prior: Path, store: Path, steps: int, refine: bool) -> str:
    """The flow: every stage at batch 1 and `steps` steps; renders 64 px (SD: upsampled to 512)."""
    coarse_cfg = 100.0 if kind == "sd21" else 20.0  # DreamFusion-SD / threestudio's IF guidance scales
    stages = {
        "encode_prompt": {},
        "coarse": {
            "steps": steps,
            "batch_size": 1,
            "resolution": 64,
            "guidance_scale": coarse_cfg,
            "checkpoint_every": 1000,
        },
        "refine": {
            "enabled": refine,
            "steps": steps,
            "batch_size": 1,
            "resolution": 64,
            "lora_warmup_steps": 1,
            "checkpoint_every": 1000,
        },
        "extract_mesh": {
            "geometry": {"steps": steps, "batch_size": 1, "render_size": 64},
            "checkpoint_every": 1000,
        },
        "texture": {"steps": steps, "batch_size": 1, "resolution": 64, "guidance": "sds", "checkpoint_every": 1000},
        "export": {},
    }
    flow = {
        "name": f"full-size-{kind}",
        "prompt": "a hamburger",
        "seed": 0,
        "prior": str(prior),
        "device": "cpu",
        "store": str(store),
        "stages": stages,
    }
    return json.dumps(flow, indent=2) + "\n"  # JSON is YAML


def _t3d_command() -> list[str]:
    script = Path(sys.executable).parent / "t3d"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from t3d.cli.main import main; sys.argv[0] = 't3d'; main()"]


_STARTED = re.compile(r"^(\w+): (started|resumed|cached)")


def _rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def run_child(cmd: list[str], env: dict, timeout_s: float, log_path: Path) -> dict:
    """Run cmd; echo its output (also to log_path); peak RSS exactly (wait4) and per stage (sampled)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO, bufsize=1, text=True, errors="replace"
    )
    state = {"stage": None, "order": []}
    stage_peak: dict[str, int] = {}

    def reader():
        with open(log_path, "w") as log:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                m = _STARTED.match(line.strip())
                if m:
                    state["stage"] = m.group(1)
                    state["order"].append(m.group(1))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    status, usage, timed_out = None, None, False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        rss = _rss_bytes(proc.pid)
        if rss is not None:
            key = state["stage"] or "startup"
            stage_peak[key] = max(stage_peak.get(key, 0), rss)
        elapsed = time.perf_counter() - t0
        if elapsed > timeout_s and not timed_out:
            timed_out = True
            print(f"full_size: the run passed --timeout {timeout_s:.0f} s; stopping it", flush=True)
            proc.send_signal(signal.SIGTERM)
        elif timed_out and elapsed > timeout_s + 60:  # SIGTERM was not enough
            proc.send_signal(signal.SIGKILL)
        time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)
    thread.join(timeout=10)
    return {
        "rc": proc.returncode,
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 3),  # ru_maxrss is in KiB on Linux
        "stage_peak_rss_gib": {k: round(v / GIB, 3) for k, v in stage_peak.items()},
        "timed_out": timed_out,
    }


def read_store(store: Path, run_name: str) -> dict:
    """Per-stage manifests of the run named `run_name`: {stage: manifest}."""
    records = sorted((store / "runs").glob(f"{run_name}*.json"), key=lambda p: p.stat().st_mtime)
    if not records:
        return {}
    rec = json.loads(records[-1].read_text())
    out = {}
    for stage, key in rec.get("stages", {}).items():
        path = store / "objects" / key / "manifest.json"
        if path.is_file():
            out[stage] = json.loads(path.read_text())
    return out


def step_split(manifests: dict, steps: int) -> dict:
    """Seconds per step, by phase where the stage records phases (means over the run's steps)."""
    per = lambda v: round(v / steps, 2)  # noqa: E731
    split: dict = {}
    t = manifests.get("coarse", {}).get("timings", {})
    if t:
        split["coarse"] = {k: per(t[k]) for k in ("render_s", "prior_forward_s", "backward_s", "optimizer_s") if k in t}
        split["coarse"]["step_s"] = round(sum(split["coarse"].values()), 2)
    t = manifests.get("refine", {}).get("timings", {})
    if t:
        split["refine"] = {k: per(t[k]) for k in ("field_step_s", "lora_step_s") if k in t}
        if "lora_warmup_s" in t:
            split["refine"]["lora_warmup_step_s"] = t["lora_warmup_s"]  # one warm-up step
        if "field_step_s" in t and "lora_step_s" in t:
            split["refine"]["step_s"] = round(split["refine"]["field_step_s"] + split["refine"]["lora_step_s"], 2)
    t = manifests.get("extract_mesh", {}).get("timings", {})
    if "loop_s" in t:
        split["extract_mesh"] = {"geometry_step_s": per(t["loop_s"])}
    t = manifests.get("texture", {}).get("timings", {})
    if "loop_s" in t:
        split["texture"] = {"step_s": per(t["loop_s"])}
    return split


# ---- one prior ------------------------------------------------------------------------------------


def bench_one(kind: str, args, workdir: Path) -> dict:
    folder = workdir / f"prior-{kind}"
    store = workdir / f"store-{kind}"
    flow = workdir / f"flow-{kind}.yaml"
    print(f"full_size: building the {kind} prior in {folder} ...", flush=True)
    build_cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_build",
        kind,
        "--_out",
        str(folder),
        "--t5-layers",
        str(args.t5_layers),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", T3D_TORCH_THREADS=str(args.threads))
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    build = run_child(build_cmd, env, args.timeout, workdir / f"build-{kind}.log")
    if build["rc"] != 0:
        return {"error": f"building the prior failed (exit {build['rc']}); see the output above"}
    info = json.loads((folder / "build.json").read_text())
    flow.write_text(flow_yaml(kind, folder, store, args.steps, args.refine))
    print(f"full_size: t3d run {flow} --no-prefect", flush=True)
    run = run_child(_t3d_command() + ["run", str(flow), "--no-prefect"], env, args.timeout, workdir / f"run-{kind}.log")
    manifests = read_store(store, f"full-size-{kind}")
    result: dict = {
        "ok": run["rc"] == 0 and not run["timed_out"],
        "rc": run["rc"],
        "stages_s": {s: m.get("timings", {}).get("total_s") for s, m in manifests.items()},
        "total_s": run["wall_s"],
        "peak_rss_gib": run["peak_rss_gib"],
        "stage_peak_rss_gib": run["stage_peak_rss_gib"],
        "step_split": step_split(manifests, args.steps),
        "steps_per_stage": args.steps,
        "batch_size": 1,
        "threads": args.threads,
        "build": {"s": build["wall_s"], "peak_rss_gib": build["peak_rss_gib"], **info},
    }
    if kind == "sd21":
        result.update(
            latent="64x64x4 from 512 px: 64 px renders upsampled (bilinear) to 512, VAE-encoded with gradients",
            text=(
                "OpenCLIP ViT-H/14 text tower (CLIPTextModel 1024 x 23 layers, 340.4M), a generated BPE "
                "vocabulary of the real 49,408 tokens, 77 tokens"
            ),
        )
    else:
        from t3d.priors.configs import EXPECTED_PARAMS, t5_layer_params

        full = EXPECTED_PARAMS["if_m.text_encoder"]
        enc = info.get("t5_encode", {})
        result.update(
            pixels="64x64x3 renders straight into the UNet (IF stage I is pixel-space; no VAE)",
            unet=(
                "IF-I-M-sized: 371.6M parameters against the model card's 400M; diffusers' IF layout, widths "
                "(192, 384, 576, 768) "
                "reconstructed (the released config.json was not available here)"
            ),
            text=(
                f"T5-XXL widths (d_model 4096, d_ff 10240, 64 heads, vocab 32,128) but {args.t5_layers} of 24 layers: "
                f"{info['params'].get('text_encoder', 0):,} of {full:,} parameters. NOT the real text encoder"
            ),
            t5_encode_measured=enc,
            t5_xxl_full={
                "params": full,
                "fp32_gib": round(full * 4 / GIB, 2),
                "per_layer_params": t5_layer_params(),
                "encode_s_estimate": round(enc["s_per_layer"] * T5_XXL_LAYERS, 1) if enc else None,
                "why_not_run": (
                    f"{full * 4 / GIB:.1f} GiB of fp32 weights alone exceed the 12 GiB RSS budget (24 GiB "
                    "machine, shared; t3d loads "
                    "priors in fp32 on a CPU); time is not the limit (encode_s_estimate: the measured "
                    "seconds per layer x 24)"
                ),
            },
        )
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--which", default="sd21,if", help="comma-separated: sd21, if")
    ap.add_argument(
        "--steps", type=int, default=2, help="optimisation steps per stage (coarse, refine, geometry, texture)"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads in the run (t3d's default on <= 2 cores is 1)"
    )
    ap.add_argument(
        "--t5-layers", type=int, default=2, help="T5-XXL encoder layers in the IF-sized prior (the real model has 24)"
    )
    ap.add_argument("--no-refine", dest="refine", action="store_false", help="leave out the VSD refine stage")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where priors, flows and stores go (default: a new temp folder)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder (priors are ~3.6 GB for SD 2.1)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process before it is stopped")
    ap.add_argument(
        "--dry-run", action="store_true", help="parameter counts on the meta device, checked; nothing saved or run"
    )
    ap.add_argument("--_build", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    kinds = [k.strip() for k in args.which.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise SystemExit(f"unknown prior(s) {unknown}: use {', '.join(KINDS)}")
    if not 1 <= args.t5_layers <= T5_XXL_LAYERS:
        raise SystemExit(f"--t5-layers must be 1..{T5_XXL_LAYERS}")
    if args._build:  # the child that builds and saves one prior
        torch.set_num_threads(max(1, args.threads))
        info = build_prior_folder(args._build, args._out, t5_layers=args.t5_layers)
        (args._out / "build.json").write_text(json.dumps(info))
        return info
    if args.dry_run:
        out = dry_run(kinds, args.t5_layers)
        print(json.dumps(out))
        if not out["ok"]:
            raise SystemExit(1)
        return out
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="t3d-full-size-"))
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    t0 = time.perf_counter()
    try:
        for kind in kinds:
            result[kind] = bench_one(kind, args, workdir)
            if not args.keep:  # free the disk before the next prior
                shutil.rmtree(workdir / f"prior-{kind}", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result["bench_s"] = round(time.perf_counter() - t0, 1)
    result["within_30_min"] = result["bench_s"] <= 1800
    result["cpu"] = f"{os.cpu_count()} cores, torch {torch.__version__}"
    if args.keep:
        result["workdir"] = str(workdir)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
