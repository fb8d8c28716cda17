"""Small real stages for orchestration tests: arithmetic on files, one that fails on demand.

`T3D_TEST_FAIL_ONCE=<path>`: stage `b` fails while that file exists and deletes it, so the
first run fails and the re-run succeeds (a crash the user then fixed). If the file holds text,
only prompts containing that text fail. `T3D_TEST_SLEEP=<s>`: stage `a` takes that long (a
window to kill a run in).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from t3d.stage import Stage, StageParams
from t3d.stages import StageRegistry


class AParams(StageParams):
    value: int = 3


class BParams(StageParams):
    factor: int = 2


class CParams(StageParams):
    offset: int = 1


def _count(name: str, prompt: str = "") -> None:
    log = os.environ.get("T3D_TEST_CALLS")
    if log:
        with open(log, "a") as f:
            f.write(name + ("\t" + prompt if os.environ.get("T3D_TEST_CALLS_PROMPTS") else "") + "\n")


def run_a(ctx):
    _count("a", ctx.prompt)
    time.sleep(float(os.environ.get("T3D_TEST_SLEEP", "0")))
    (ctx.out / "value.json").write_text(json.dumps({"value": ctx.params.value + ctx.seed}))


def run_b(ctx):
    _count("b", ctx.prompt)
    marker = os.environ.get("T3D_TEST_FAIL_ONCE")
    if marker and Path(marker).exists() and Path(marker).read_text().strip() in ctx.prompt:
        Path(marker).unlink()
        raise RuntimeError("stage b failed on purpose")
    value = json.loads((ctx.inputs["a"] / "value.json").read_text())["value"]
    (ctx.out / "value.json").write_text(json.dumps({"value": value * ctx.params.factor}))
    ctx.metrics["value"] = value * ctx.params.factor


def run_c(ctx):
    _count("c", ctx.prompt)
    value = json.loads((ctx.inputs["b"] / "value.json").read_text())["value"]
    (ctx.out / "value.json").write_text(json.dumps({"value": value + ctx.params.offset}))


def REGISTRY() -> StageRegistry:
    return StageRegistry(
        [
            Stage("a", "1", AParams, (), run_a, uses_prompt=True),
            Stage("b", "1", BParams, ("a",), run_b),
            Stage("c", "1", CParams, ("b",), run_c),
        ]
    )
