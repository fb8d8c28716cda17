"""Scale-out for real: a Prefect server on 127.0.0.1, a process worker on a pool, deployments,
a batch routed to the pool with one failing prompt, checked through Prefect's API."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POOL = "t3d-test-pool"


async def _flow_runs(api: str):
    """Ask *this* server (another test may have left a session-wide Prefect server configured)."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async with PrefectClient(api) as client:
        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["t3d-prompt"])))
        artifacts = await client.read_artifacts()
    return runs, artifacts


def _stop_process_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the worker's group, then SIGKILL: Prefect's graceful shutdown has hung past 30 s on a busy CI box."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


@pytest.mark.slow
def test_batch_on_a_work_pool(tmp_path, monkeypatch):
    from t3d.flows.server import server_env, start_server

    store = tmp_path / "store"
    flow = tmp_path / "base.yaml"
    flow.write_text(f"prior: tiny-pixel\nstore: {store}\nexecutor: {{pool: {POOL}}}\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue cone\na green torus\n")
    marker = tmp_path / "fail-once"
    marker.write_text("blue")
    calls = tmp_path / "calls.txt"

    with start_server(tmp_path / "prefect", ui=False) as server:
        env = server_env(tmp_path / "prefect", server.api_url)
        env.update(
            T3D_STAGE_REGISTRY="tests.flowstages:REGISTRY",
            T3D_TEST_FAIL_ONCE=str(marker),
            T3D_TEST_CALLS=str(calls),
            T3D_TEST_CALLS_PROMPTS="1",
            PYTHONPATH=str(ROOT),
            TQDM_DISABLE="1",
        )
        monkeypatch.setenv("PREFECT_API_URL", server.api_url)
        cli = [sys.executable, "-m", "t3d.cli.main"]
        deployed = subprocess.run(
            [*cli, "deploy", "--pool", POOL], env=env, capture_output=True, text=True, timeout=300
        )
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        assert f"t3d-prompt/{POOL}" in deployed.stdout and f"t3d-stage/{POOL}" in deployed.stdout

        log = open(tmp_path / "worker.log", "wb")
        worker = subprocess.Popen(
            [*cli, "worker", "--pool", POOL, "--limit", "2"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,
        )
        try:
            batch = [*cli, "batch", str(prompts), "--flow", str(flow), "-j", "3", "--summary", str(tmp_path / "sum")]
            first = subprocess.run(batch, env=env, capture_output=True, text=True, timeout=600)
            assert first.returncode == 1, first.stdout + first.stderr + (tmp_path / "worker.log").read_text()[-3000:]

            runs, artifacts = asyncio.run(_flow_runs(server.api_url))
            states = sorted(r.state.type.value for r in runs)
            assert states == ["COMPLETED", "COMPLETED", "FAILED"], states
            failed = next(r for r in runs if r.state.is_failed())
            assert failed.parameters["prompt"] == "a blue cone"
            keys = {a.key for a in artifacts if a.key}
            assert any(k.startswith("a-red-cube-c") for k in keys), keys  # the markdown artifact of stage c
            assert "batch-prompts" in keys, keys  # the batch summary table
            assert {a.type for a in artifacts if a.key == "batch-prompts"} == {"table"}

            calls.write_text("")
            second = subprocess.run(batch, env=env, capture_output=True, text=True, timeout=600)
            assert second.returncode == 0, second.stdout + second.stderr
            worked = {line.split("\t")[1] for line in calls.read_text().splitlines() if line}
            assert worked == {"a blue cone"}
            runs, _ = asyncio.run(_flow_runs(server.api_url))
            assert len(runs) == 4, "the re-run sends only the unfinished prompt to the pool"
        finally:
            _stop_process_group(worker)
