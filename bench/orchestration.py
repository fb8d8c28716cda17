"""Orchestration overhead: what Prefect + the artifact store cost per stage, and a cached re-run.

A 6-stage flow of trivial stages (each writes one small file) so the numbers are pure overhead:
  overhead_s_per_stage  wall time of a fresh run through Prefect / 6 (server already up)
  store_s_per_stage     the same run in-process without Prefect / 6 (store + planning alone)
  cached_rerun_s        `t3d run flow.yaml` from the shell once everything is finished (goal < 10 s)
  first_run_cli_s       `t3d run flow.yaml` from the shell on a fresh store, temporary server included
Last output: one JSON object.  Usage: python bench/orchestration.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from t3d.stage import Stage, StageParams  # noqa: E402
from t3d.stages import StageRegistry  # noqa: E402

NAMES = ["s1", "s2", "s3", "s4", "s5", "s6"]


class TinyParams(StageParams):
    salt: int = 0


def _run(ctx) -> None:
    upstream = sum(int((p / "n.txt").read_text()) for p in ctx.inputs.values())
    (ctx.out / "n.txt").write_text(str(upstream + ctx.params.salt + 1))


def REGISTRY() -> StageRegistry:
    return StageRegistry(
        [Stage(n, "1", TinyParams, tuple(NAMES[i - 1 : i]), _run, uses_prompt=(i == 0)) for i, n in enumerate(NAMES)]
    )


def _flow_file(folder: Path, prior: str) -> Path:
    path = folder / "flow.yaml"
    path.write_text(
        textwrap.dedent(f"""
        prompt: a red cube
        prior: {prior}
        store: ./store
        """)
    )
    return path


def _cli(flow: Path, env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "t3d.cli.main", "run", str(flow)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"t3d run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - t0


def main() -> None:
    from prefect.testing.utilities import prefect_test_harness

    from t3d.flows.config import validate
    from t3d.flows.flow import run_prompt
    from t3d.stages import registry_from_spec

    reg = registry_from_spec("orchestration:REGISTRY")  # a flow loads it from this spec
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prior = "tiny-pixel"  # the stages never load it; only its identity enters the keys
        env = {
            **os.environ,
            "T3D_STAGE_REGISTRY": "orchestration:REGISTRY",
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            "TQDM_DISABLE": "1",
        }
        env.pop("PREFECT_API_URL", None)

        flow = _flow_file(tmp, str(prior))
        first_cli = _cli(flow, env)
        cached = min(_cli(flow, env) for _ in range(3))

        def cfg(store: Path, salt: int):
            return validate(
                {"prompt": "a red cube", "prior": str(prior), "store": str(store), "stages": {"s1": {"salt": salt}}},
                reg,
            )

        t0 = time.perf_counter()
        for salt in range(3):
            run_prompt(cfg(tmp / "inline", salt), "a red cube", reg, use_prefect=False, show_progress=False)
        store_s = (time.perf_counter() - t0) / 3 / len(NAMES)

        with prefect_test_harness(server_startup_timeout=120):
            run_prompt(cfg(tmp / "warm", 99), "a red cube", reg, show_progress=False)  # warm-up: client, DB
            times = []
            for salt in range(3):
                t0 = time.perf_counter()
                result = run_prompt(cfg(tmp / "prefect", salt), "a red cube", reg, show_progress=False)
                times.append(time.perf_counter() - t0)
                assert result.state == "completed", result.error
        overhead = min(times) / len(NAMES)

    print(
        json.dumps(
            {
                "overhead_s_per_stage": round(overhead, 4),
                "store_s_per_stage": round(store_s, 4),
                "cached_rerun_s": round(cached, 3),
                "first_run_cli_s": round(first_cli, 3),
                "stages": len(NAMES),
                "cached_rerun_goal_s": 10,
            }
        )
    )


if __name__ == "__main__":
    main()
