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


class _FakeServer:
    api_url = "http://127.0.0.1:5555/api"

    def __init__(self, data_dir, events):
        self.data_dir, self.events = data_dir, events

    def release(self):
        self.events.append("released")

    def stop(self):
        self.events.append("stopped")


def test_prefect_connection_is_the_one_way_to_an_api(tmp_path, monkeypatch):
    """Configured API first; else the data folder's shared server (released at close); dedicated:
    a new server of its own, stopped at close. child_env points children at whichever it got."""
    from t3d.flows import server as srv

    events: list = []
    monkeypatch.setattr(srv, "start_server", lambda data_dir, **kw: events.append(kw) or _FakeServer(data_dir, events))
    monkeypatch.setattr(srv, "healthy", lambda url, timeout=5.0: True)
    monkeypatch.setattr(srv, "_configured_api", lambda: "http://configured:4200/api")
    with srv.PrefectConnection() as conn:
        assert conn.child_env()["PREFECT_API_URL"] == "http://configured:4200/api" and conn.server is None
    assert events == [], "a configured API that answers starts nothing"

    with srv.PrefectConnection(data_dir=tmp_path / "own", dedicated=True, ui=True, port=4300) as conn:
        env = conn.child_env()
        assert env["PREFECT_API_URL"] == _FakeServer.api_url and env["PREFECT_HOME"] == str(tmp_path / "own")
    assert events[0]["shared"] is False and events[0]["ui"] is True and events[0]["port"] == 4300
    assert events[-1] == "stopped"

    monkeypatch.setattr(srv, "_configured_api", lambda: None)
    with srv.PrefectConnection(data_dir=tmp_path / "shared") as conn:
        assert conn.api_url() == _FakeServer.api_url
    assert events[-2]["shared"] is True and events[-2]["ui"] is False and events[-1] == "released"


def test_run_batch_children_report_to_the_connection(tmp_path, monkeypatch):
    from t3d.flows import batch

    flow = tmp_path / "base.yaml"
    flow.write_text("prior: tiny-pixel\nstore: ./store\n")
    seen = []

    class Connection:
        def child_env(self):
            return {"PREFECT_API_URL": "http://127.0.0.1:5555/api", "PATH": "/bin"}

    def fake_run(cmd, capture_output, text, env):
        seen.append((cmd, env))
        return subprocess.CompletedProcess(cmd, 1, "", "boom")

    monkeypatch.setattr(batch.subprocess, "run", fake_run)
    rows = batch.run_batch(flow, ["a red cube"], env={"TQDM_DISABLE": "1"}, prefect=Connection())
    ((cmd, env),) = seen
    assert cmd[-2:] == ["--prompt", "a red cube"]
    assert env == {"PREFECT_API_URL": "http://127.0.0.1:5555/api", "PATH": "/bin", "TQDM_DISABLE": "1"}
    assert rows[0].state == "failed" and rows[0].error == "boom"
