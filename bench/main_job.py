"""Wall time of the README's main job, `t3d run examples/sds_red_cube.yaml`, as a new user runs it.

cold: a fresh artifact store and a Prefect data folder as install.sh leaves it (database created,
no server running: the run starts the server); --unprepared leaves the folder empty instead (the
run's server then also creates the database, as after an install that could not);
warm: a fresh store again, with a Prefect server on that folder already up (this script holds it).
Each run is a subprocess of the installed `t3d` CLI; its per-stage seconds, quality metrics and
timing splits come from the stages' manifests in the run's store. --no-prefect runs the stages
in-process instead (what CI and a busy machine can afford); --runs picks cold, warm or both.
--set KEY=VALUE overrides the flow (repeatable, dotted keys: stages.coarse.steps=20) for a quick
smoke run. Last output: one JSON object {"runs": {"cold": {...}, "warm": {...}}, "flow", "threads"}.
Usage: python bench/main_job.py [--runs cold,warm] [--no-prefect] [--unprepared] [--threads 2] [--set K=V ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
FLOW = ROOT / "examples" / "sds_red_cube.yaml"
STAGES = ("encode_prompt", "coarse", "refine", "extract_mesh", "texture", "export")


def _t3d() -> str:
    exe = Path(sys.executable).with_name("t3d")
    return str(exe) if exe.exists() else shutil.which("t3d") or "t3d"


def _override(flow: dict, pairs: list[str]) -> dict:
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE, e.g. stages.coarse.steps=20")
        node = flow
        *parents, leaf = key.strip().split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(value)
    return flow


def stage_summary(store: Path) -> dict:
    """Per stage: total seconds, the timing splits and the quality metrics of its manifest."""
    out = {}
    for manifest in sorted((store / "objects").glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        metrics = m.get("metrics", {})
        out[m["stage"]] = {
            "s": m.get("timings", {}).get("total_s"),
            "timings": m.get("timings", {}),
            **{k: metrics[k] for k in ("iou", "color_err", "steps") if k in metrics},
        }
    return {k: out[k] for k in STAGES if k in out}


def run_once(flow: dict, work: Path, env: dict, no_prefect: bool) -> dict:
    work.mkdir(parents=True)
    flow = {**flow, "store": str(work / "store")}
    path = work / "flow.yaml"
    path.write_text(yaml.safe_dump(flow, sort_keys=False))
    cmd = [_t3d(), "run", str(path)] + (["--no-prefect"] if no_prefect else [])
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"t3d run failed with exit {proc.returncode}")
    stages = stage_summary(work / "store")
    return {
        "wall_s": round(wall, 2),
        "stages_s": round(sum(s["s"] or 0.0 for s in stages.values()), 2),
        "outside_stages_s": round(wall - sum(s["s"] or 0.0 for s in stages.values()), 2),
        **machine_yardstick(stages, wall),
        "stages": stages,
    }


def machine_yardstick(stages: dict, wall: float) -> dict:
    """These machines differ ~3x in speed. The prior's forward pass per coarse step (the step's
    floor, which no 3D-side work changes) measures this one, so walls from different machines
    compare as wall / prior_step_s: the main job's cost in prior forward passes."""
    coarse = stages.get("coarse", {})
    steps, prior_s = coarse.get("steps"), coarse.get("timings", {}).get("prior_forward_s")
    if not prior_s or not steps:
        return {}
    per_step = prior_s / steps
    return {"prior_step_s": round(per_step, 4), "wall_in_prior_steps": round(wall / per_step)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="cold,warm")
    ap.add_argument("--no-prefect", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="T3D_TORCH_THREADS for the runs (default: unset)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    ap.add_argument("--unprepared", action="store_true", help="cold: an empty Prefect folder, no database yet")
    ap.add_argument("--keep", action="store_true", help="keep the temporary stores (their path is printed)")
    args = ap.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or set(runs) - {"cold", "warm"}:
        raise SystemExit(f"--runs {args.runs!r}: use cold, warm or cold,warm")
    flow = _override(yaml.safe_load(FLOW.read_text()), args.overrides)
    tmp = Path(tempfile.mkdtemp(prefix="t3d-main-job-"))
    env = {**os.environ, "T3D_PREFECT_HOME": str(tmp / "prefect")}
    env.pop("PREFECT_API_URL", None)  # t3d's own local server, as for a new user
    if args.threads:
        env["T3D_TORCH_THREADS"] = str(args.threads)
    result: dict = {}
    server = None
    if not args.no_prefect and not args.unprepared:
        from t3d.flows.server import prepare_data_dir

        prepare_data_dir(tmp / "prefect")  # what install.sh does for the default folder (untimed)
    try:
        for name in runs:
            if name == "warm" and not args.no_prefect:
                from t3d.flows.server import start_server

                # this process holds a lease, so the server outlives the cold run and serves the warm one
                server = start_server(tmp / "prefect", shared=True)
            result[name] = run_once(flow, tmp / name, env, args.no_prefect)
            print(f"{name}: wall {result[name]['wall_s']} s, stages {result[name]['stages_s']} s", flush=True)
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"stores kept under {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    out = {
        "runs": result,
        "flow": str(FLOW.relative_to(ROOT)),
        "overrides": args.overrides,
        "threads": args.threads,
        "prefect_folder": "unprepared" if args.unprepared else "prepared as by install.sh",
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
