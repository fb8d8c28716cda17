"""`t3d run` and `t3d server` with t3d's own local Prefect server: shared by concurrent runs,
gone after a kill -9 or SIGTERM, and never a reason for a run to fail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from t3d.flows.server import healthy, live_leases, server_pids

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "t3d.cli.main"]
pytestmark = pytest.mark.slow


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        T3D_STAGE_REGISTRY="tests.flowstages:REGISTRY",
        T3D_PREFECT_HOME=str(tmp_path / "prefect"),
        PYTHONPATH=str(ROOT),
        TQDM_DISABLE="1",
        **extra,
    )
    return env


def _flow(tmp_path) -> Path:
    flow = tmp_path / "flow.yaml"
    flow.write_text("prompt: a red cube\nprior: tiny-pixel\nstore: ./store\n")
    return flow


def _wait_gone(data_dir: Path, seconds: float = 60) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = server_pids(data_dir)
        if not left:
            return []
        time.sleep(0.5)
    return server_pids(data_dir)


def test_concurrent_runs_share_one_server_and_leave_nothing_running(tmp_path):
    flow = _flow(tmp_path)
    env = _env(tmp_path)
    runs = [
        subprocess.Popen(
            [*CLI, "run", str(flow), "--set", f"seed={s}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for s in (1, 2)
    ]
    outputs = [p.communicate(timeout=600) for p in runs]
    for p, (stdout, stderr) in zip(runs, outputs):
        assert p.returncode == 0, stdout + stderr
        assert "not in Prefect" not in stderr, stderr  # both really ran in Prefect
        assert "HTTP Request" not in stdout + stderr and "Traceback" not in stdout + stderr
        assert "b: started" in stderr and "b: done in" in stderr
        assert "deliverable:" in stdout
        assert "outputs: outputs/a-red-cube/" in stdout  # under the cwd: shown relative to it
        paths = ("deliverable:", "outputs:", "report:")
        table = [line for line in stdout.splitlines() if not line.startswith(paths)]
        assert max(len(line) for line in table) <= 80, stdout
    log = (tmp_path / "prefect" / "server.log").read_text()
    assert log.count("prefect config set PREFECT_API_URL=") == 1, "one server started; the second run joined it"
    assert _wait_gone(tmp_path / "prefect") == []
    assert not (tmp_path / "prefect" / "server.json").exists()


def test_kill_9_of_a_run_leaves_no_server_and_the_rerun_resumes(tmp_path):
    flow = _flow(tmp_path)
    env = _env(tmp_path, T3D_TEST_SLEEP="120")
    proc = subprocess.Popen(
        [*CLI, "run", str(flow)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # wait until stage a is running inside Prefect
        if "a: started" in line or time.monotonic() > deadline:
            break
    assert server_pids(tmp_path / "prefect"), "a server was running for the run"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert _wait_gone(tmp_path / "prefect") == []
    again = subprocess.run(
        [*CLI, "run", str(flow)], env=_env(tmp_path), capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "a: done in" in again.stderr and "c: done in" in again.stderr
    assert _wait_gone(tmp_path / "prefect") == []


def test_sigterm_stops_t3d_server(tmp_path):
    env = _env(tmp_path)
    port = __import__("t3d.flows.server", fromlist=["free_port"]).free_port()
    proc = subprocess.Popen(
        [*CLI, "server", "--port", str(port), "--data", str(tmp_path / "prefect")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 300
    while not healthy(api) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    assert healthy(api)
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    assert _wait_gone(tmp_path / "prefect") == []
    assert not healthy(api, timeout=2)


@pytest.mark.parametrize("how", ["start budget missed", "configured API down"])
def test_run_without_reachable_prefect_runs_locally_with_one_warning(tmp_path, how):
    flow = _flow(tmp_path)
    extra = (
        {"T3D_PREFECT_START_TIMEOUT": "0.2"}
        if how == "start budget missed"
        else {"PREFECT_API_URL": "http://127.0.0.1:9/api"}
    )
    res = subprocess.run(
        [*CLI, "run", str(flow)], env=_env(tmp_path, **extra), capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert res.returncode == 0, res.stdout + res.stderr
    warnings = [line for line in res.stderr.splitlines() if "not in Prefect" in line]
    assert len(warnings) == 1, res.stderr
    assert "c: done in" in res.stderr and "Traceback" not in res.stderr
    assert _wait_gone(tmp_path / "prefect") == []


def test_leases_of_dead_processes_are_dropped(tmp_path):
    leases = tmp_path / "leases"
    leases.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (leases / f"{dead.pid}.abc").touch()
    (leases / f"{os.getpid()}.def").touch()
    assert [p.name for p in live_leases(leases)] == [f"{os.getpid()}.def"]
    assert not (leases / f"{dead.pid}.abc").exists()


def test_server_prepare_creates_the_database_and_starts_nothing(tmp_path):
    """What install.sh runs: the database exists afterwards (a first run's server only has to
    start) and no server is left running."""
    env = _env(tmp_path)
    data = tmp_path / "prefect"
    proc = subprocess.run([*CLI, "server", "--prepare"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"Prefect database ready in {data}" in proc.stdout
    assert (data / "prefect.db").stat().st_size > 100_000
    assert not (data / "server.json").exists() and server_pids(data) == []
    import sqlite3

    with sqlite3.connect(data / "prefect.db") as db:
        tables = {row[0] for row in db.execute("select name from sqlite_master where type='table'")}
    assert {"flow_run", "task_run", "artifact", "alembic_version"} <= tables


def test_server_prepare_names_the_folder_it_cannot_use():
    from t3d.flows.server import prepare_data_dir

    with pytest.raises(RuntimeError, match=r"cannot prepare a Prefect database in /proc/t3d-nope: "):
        prepare_data_dir("/proc/t3d-nope")
