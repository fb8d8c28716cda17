"""Batch throughput: a 4-prompt batch at concurrency 1 vs 2, and the scheduling overhead per flow run.

Each batch runs on a fresh store against one dedicated Prefect server (as `t3d batch` does), with
the real stages at small step counts (override with --set). Overhead per flow run = the wall time
of its `t3d run` process minus the seconds its stages spent computing.
Last output: one JSON object.
Usage: python bench/batch.py [--set stages.coarse.steps=20 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["a red cube", "a blue sphere", "a green cone", "a yellow torus"]
DEFAULT_SETS = ["stages.coarse.steps=20", "stages.coarse.checkpoint_every=1000"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", dest="sets", action="append", default=None)
    parser.add_argument("--upto", default="coarse", help="last enabled stage")
    args = parser.parse_args()

    from t3d.flows.batch import run_batch
    from t3d.flows.server import PrefectConnection
    from t3d.stages import default_registry

    names = list(default_registry())
    upto = names.index(args.upto) if args.upto in names else len(names) - 1
    sets = args.sets if args.sets is not None else [s for s in DEFAULT_SETS if s.split(".")[1] in names[: upto + 1]]
    sets += [f"stages.{n}.enabled=false" for n in names[upto + 1 :]]

    out: dict = {"prompts": len(PROMPTS), "stages": names[: upto + 1], "overrides": sets}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with PrefectConnection(data_dir=tmp / "prefect", dedicated=True) as prefect:
            if prefect.api_url() is None:
                sys.exit(f"no Prefect server: {prefect.problem}")
            for concurrency in (1, 2):
                flow = tmp / f"flow{concurrency}.yaml"
                flow.write_text(f"prompt: placeholder\nstore: {tmp / f'store{concurrency}'}\n")
                t0 = time.perf_counter()
                rows = run_batch(flow, PROMPTS, concurrency, sets, env={"TQDM_DISABLE": "1"}, prefect=prefect)
                wall = time.perf_counter() - t0
                failed = [r for r in rows if r.state == "failed"]
                if failed:
                    sys.exit(f"batch failed: {failed[0].prompt}: {failed[0].error}")
                overheads = [r.seconds - _stage_seconds(tmp / f"store{concurrency}", r.run_id) for r in rows]
                out[f"wall_s_concurrency_{concurrency}"] = round(wall, 2)
                out[f"overhead_s_per_flow_run_concurrency_{concurrency}"] = round(sum(overheads) / len(overheads), 2)
    out["speedup_2_vs_1"] = round(out["wall_s_concurrency_1"] / out["wall_s_concurrency_2"], 3)
    print(json.dumps(out))


def _stage_seconds(store: Path, run_id: str) -> float:
    record = json.loads((store / "runs" / f"{run_id}.json").read_text())
    return sum(r["seconds"] for r in record.get("results", []) if r.get("state") == "computed")


if __name__ == "__main__":
    main()
