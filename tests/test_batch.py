"""`t3d batch` end to end with a dedicated Prefect server: failures isolated, re-run resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from t3d.flows.batch import read_prompts
from t3d.flows.config import ConfigError


def test_read_prompts_ignores_comments_blanks_and_duplicates(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# my prompts\na red cube\n\n  a  blue cone  # inline comment\na red cube\n")
    assert read_prompts(path) == ["a red cube", "a blue cone"]
    path.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="no prompts"):
        read_prompts(path)


@pytest.mark.slow
def test_batch_isolates_failures_and_resumes(tmp_path):
    flow = tmp_path / "base.yaml"
    flow.write_text("prior: tiny-pixel\nstore: ./store\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue cone\n# skipped\na green torus\na red cube\n")
    marker = tmp_path / "fail-once"
    marker.write_text("blue")
    calls = tmp_path / "calls.txt"
    env = {
        **os.environ,
        "T3D_STAGE_REGISTRY": "tests.flowstages:REGISTRY",
        "T3D_TEST_FAIL_ONCE": str(marker),
        "T3D_TEST_CALLS": str(calls),
        "T3D_TEST_CALLS_PROMPTS": "1",
        "PYTHONPATH": str(Path(__file__).parents[1]),
    }
    env.pop("PREFECT_API_URL", None)
    cmd = [
        sys.executable,
        "-m",
        "t3d.cli.main",
        "batch",
        str(prompts),
        "--flow",
        str(flow),
        "-j",
        "2",
        "--summary",
        str(tmp_path / "sum"),
        "--data",
        str(tmp_path / "prefect"),
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 1, first.stdout + first.stderr
    rows = {r["prompt"]: r for r in json.loads((tmp_path / "sum.json").read_text())}
    assert set(rows) == {"a red cube", "a blue cone", "a green torus"}
    assert rows["a blue cone"]["state"] == "failed" and "failed on purpose" in rows["a blue cone"]["error"]
    assert rows["a red cube"]["state"] == rows["a green torus"]["state"] == "completed"
    assert "a blue cone" in (tmp_path / "sum.csv").read_text()

    calls.write_text("")
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    worked = {line.split("\t")[1] for line in calls.read_text().splitlines() if line}
    assert worked == {"a blue cone"}, "only the failed prompt does work on the re-run"
    rows = {r["prompt"]: r for r in json.loads((tmp_path / "sum.json").read_text())}
    assert rows["a blue cone"]["computed_stages"] == ["b", "c"] and rows["a red cube"]["state"] == "cached"
