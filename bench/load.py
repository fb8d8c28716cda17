"""The README's main job on a busy machine: `t3d run examples/sds_red_cube.yaml` from a fresh store
and a fresh Prefect data folder (the first-start path, database migration included), with N
CPU-bound processes running beside it for the whole run (each bounded by --limit-s).

Passes when the run exits 0, in Prefect, with a GLB, no traceback, no HTTP request logs, and no
Prefect server left running afterwards.
Last output line: one JSON object.
Usage: python bench/load.py [--hogs 2] [--limit-s 3600] [--set stages.coarse.steps=50 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from t3d.flows.server import server_pids

ROOT = Path(__file__).resolve().parents[1]
HOG = (
    "import time, sys\nend = time.monotonic() + float(sys.argv[1])\nx = 0\n"
    "while time.monotonic() < end:\n    x = (x * 31 + 7) % 1000003\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flow", default=str(ROOT / "examples" / "sds_red_cube.yaml"))
    ap.add_argument("--hogs", type=int, default=2, help="CPU-bound processes beside the run")
    ap.add_argument("--limit-s", type=float, default=3600, help="the hogs stop after this long at the latest")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="override a flow key (smoke runs)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="t3d-load-"))
    flow = work / Path(args.flow).name
    shutil.copy(args.flow, flow)
    prefect_home = work / "prefect"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(T3D_PREFECT_HOME=str(prefect_home), TQDM_DISABLE="1")
    hogs = [subprocess.Popen([sys.executable, "-c", HOG, str(args.limit_s)]) for _ in range(args.hogs)]
    cmd = [sys.executable, "-m", "t3d.cli.main", "run", str(flow)] + [a for s in args.sets for a in ("--set", s)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work, timeout=args.limit_s)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, err = "timeout", exc.stdout or "", exc.stderr or ""
        out, err = (out.decode() if isinstance(out, bytes) else out), (err.decode() if isinstance(err, bytes) else err)
    wall = time.perf_counter() - started
    for hog in hogs:
        hog.kill()
        hog.wait()
    deadline = time.monotonic() + 60
    while len(server_pids(prefect_home)) and time.monotonic() < deadline:
        time.sleep(0.5)
    text = out + err
    glb = re.search(r"deliverable: (\S+\.glb)", out)
    stages = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+): done in ([\d.]+) s", err, re.M)}
    result = {
        "exit_code": code,
        "wall_s": round(wall, 1),
        "hogs": args.hogs,
        "in_prefect": "not in Prefect" not in err and "finishing the stages here" not in err,
        "glb": bool(glb and Path(glb.group(1)).is_file()),
        "stage_s": stages,
        "output_lines": len(text.splitlines()),
        "http_request_lines": text.count("HTTP Request"),
        "traceback": "Traceback" in text,
        "servers_left": len(server_pids(prefect_home)),
        "overrides": args.sets,
    }
    result["ok"] = bool(
        code == 0
        and result["in_prefect"]
        and result["glb"]
        and not result["traceback"]
        and not result["http_request_lines"]
        and not result["servers_left"]
    )
    if not result["ok"]:
        sys.stderr.write(text[-4000:])
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
