"""Orchestration: resume after a failure, --from, param edits, through Prefect and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from t3d.flows.config import validate
from t3d.flows.flow import run_prompt
from t3d.stages import registry_from_spec
from t3d.store import ArtifactStore

REG = registry_from_spec("tests.flowstages:REGISTRY")


@pytest.fixture
def calls(tmp_path, monkeypatch):
    log = tmp_path / "calls.txt"
    monkeypatch.setenv("T3D_TEST_CALLS", str(log))

    def read():
        lines = log.read_text().split() if log.exists() else []
        log.write_text("")
        return lines

    return read


def cfg_for(tmp_path, prior, **stages):
    return validate(
        {"prompt": "a red cube", "seed": 1, "store": str(tmp_path / "store"), "prior": prior, "stages": stages}, REG
    )


def value_of(result, stage):
    path = next(r.path for r in result.results if r.stage == stage)
    return json.loads((Path(path) / "value.json").read_text())["value"]


def test_failed_stage_resumes_where_it_stopped(tmp_path, calls, monkeypatch, identity_prior, prefect_server):
    marker = tmp_path / "fail-once"
    marker.write_text("")
    monkeypatch.setenv("T3D_TEST_FAIL_ONCE", str(marker))
    cfg = cfg_for(tmp_path, identity_prior)

    earlier = _task_runs()
    first = run_prompt(cfg, cfg.prompt, REG, show_progress=False)
    assert first.state == "failed" and first.failed_stage == "b" and "failed on purpose" in first.error
    assert calls() == ["a", "b"]
    assert [(r.stage, r.state) for r in first.results] == [("a", "computed")], "from the StageFailed the flow raised"
    tasks = sorted(v for k, v in _task_runs().items() if k not in earlier)
    assert tasks == [("a-red-cube/a", "COMPLETED"), ("a-red-cube/b", "FAILED")], "one run_stage task per stage"
    store = ArtifactStore(cfg.store)
    assert store.status(first.results[0].key) == "complete"
    assert [k for k in store.keys() if k.startswith("b-")] == [], "a failed stage leaves no artifact"

    second = run_prompt(cfg, cfg.prompt, REG, show_progress=False)
    assert second.state == "completed"
    assert [r.state for r in second.results] == ["cached", "computed", "computed"]
    assert calls() == ["b", "c"]
    assert value_of(second, "c") == (3 + 1) * 2 + 1

    third = run_prompt(cfg, cfg.prompt, REG, show_progress=False)
    assert third.state == "cached" and calls() == []


def _task_runs() -> dict:
    """Task run id -> (name, state type) in the test harness's Prefect API."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return {r.id: (r.name, r.state.type.value) for r in client.read_task_runs()}


def test_from_forces_that_stage_and_later(tmp_path, calls, identity_prior, prefect_server):
    cfg = cfg_for(tmp_path, identity_prior)
    run_prompt(cfg, cfg.prompt, REG, show_progress=False)
    assert calls() == ["a", "b", "c"]
    again = run_prompt(cfg, cfg.prompt, REG, force_from="b", show_progress=False)
    assert [r.state for r in again.results] == ["cached", "computed", "computed"]
    assert calls() == ["b", "c"]
    with pytest.raises(ValueError, match="--from nope"):
        run_prompt(cfg, cfg.prompt, REG, force_from="nope")


def test_editing_only_last_params_reruns_only_last(tmp_path, calls, identity_prior):
    cfg = cfg_for(tmp_path, identity_prior)
    run_prompt(cfg, cfg.prompt, REG, use_prefect=False, show_progress=False)
    calls()
    edited = cfg_for(tmp_path, identity_prior, c={"offset": 5})
    result = run_prompt(edited, edited.prompt, REG, use_prefect=False, show_progress=False)
    assert calls() == ["c"] and value_of(result, "c") == 13
    other_prompt = run_prompt(cfg, "a blue cone", REG, use_prefect=False, show_progress=False)
    assert [r.state for r in other_prompt.results] == ["computed"] * 3, (
        "the prompt is in the first key, so everything downstream changes"
    )


def test_tampered_upstream_is_recomputed(tmp_path, calls, identity_prior):
    cfg = cfg_for(tmp_path, identity_prior)
    first = run_prompt(cfg, cfg.prompt, REG, use_prefect=False, show_progress=False)
    calls()
    (Path(first.results[1].path) / "value.json").write_text('{"value": 999}')
    second = run_prompt(cfg, cfg.prompt, REG, use_prefect=False, show_progress=False)
    assert calls() == ["b"], "b is rejected by its hash and recomputed; c's key is unchanged"
    assert value_of(second, "c") == 9


def test_disabled_dependency_is_a_clear_error(tmp_path, identity_prior):
    cfg = cfg_for(tmp_path, identity_prior, b={"enabled": False})
    with pytest.raises(ValueError, match=r"stages.c needs stage\(s\) b"):
        run_prompt(cfg, cfg.prompt, REG, use_prefect=False)


def _cli(args, env, cwd):
    return subprocess.run(
        [sys.executable, "-m", "t3d.cli.main", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


@pytest.mark.slow
def test_cli_exit_codes_and_prefect_temporary_server(tmp_path, identity_prior):
    """The user's path: `t3d run` against Prefect's temporary server; exit 1, then 0, then 2."""
    flow = tmp_path / "flow.yaml"
    flow.write_text(
        textwrap.dedent(f"""
        prompt: a red cube
        prior: {identity_prior}
        store: ./store
        """)
    )
    marker = tmp_path / "fail-once"
    marker.write_text("")
    env = {
        **os.environ,
        "T3D_STAGE_REGISTRY": "tests.flowstages:REGISTRY",
        "T3D_TEST_FAIL_ONCE": str(marker),
        "PYTHONPATH": str(Path(__file__).parents[1]),
    }
    env.pop("PREFECT_API_URL", None)
    failed = _cli(["run", str(flow)], env, tmp_path)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "failed on purpose" in failed.stdout + failed.stderr
    ok = _cli(["run", str(flow)], env, tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "cached" in ok.stdout and "computed" in ok.stdout
    bad = _cli(["run", str(flow), "--set", "stages.b.factr=3"], env, tmp_path)
    assert bad.returncode == 2 and "did you mean 'factor'" in bad.stderr
    listed = _cli(["ls", "--store", str(tmp_path / "store")], env, tmp_path)
    assert listed.returncode == 0 and "a red cube" in listed.stdout


class _StubPrefect:
    """A PrefectConnection that answers without a server (the work pool is faked below)."""

    problem = None

    def api_url(self):
        return "http://127.0.0.1:9/api"


def test_work_pool_run_reports_real_states_seconds_and_the_failed_stage(tmp_path, calls, monkeypatch, identity_prior):
    """_run_on_pool: the caller's registry and run id go to the pool; what the remote run did is
    read back from the manifests it committed (cached vs computed, real seconds, failed stage)."""
    from types import SimpleNamespace

    from t3d import runner
    from t3d.flows import flow as flow_module
    from t3d.stages import registry_from_spec

    sent = []

    def fake_pool_run(name, parameters, run_name):  # a worker: plan and execute from the parameters
        sent.append((name, parameters))
        reg = registry_from_spec(parameters["registry"])
        cfg = validate(parameters["config"], reg)
        store = ArtifactStore(cfg.store)
        ok = True
        for step in runner.plan(cfg, parameters["prompt"], reg, store, parameters["force_from"]):
            try:
                runner.execute(cfg, parameters["prompt"], step, reg, store, show_progress=False)
            except runner.StageFailed:
                ok = False
                break
        state = SimpleNamespace(is_completed=lambda: ok, name="Completed" if ok else "Failed", message="stage b")
        return SimpleNamespace(name="fake-run", state=state)

    monkeypatch.setattr(flow_module, "_wait_deployment", fake_pool_run)
    marker = tmp_path / "fail-once"
    marker.write_text("")
    monkeypatch.setenv("T3D_TEST_FAIL_ONCE", str(marker))
    data = {"prompt": "a red cube", "seed": 1, "store": str(tmp_path / "store"), "prior": identity_prior}
    cfg = validate({**data, "executor": {"pool": "gpu"}}, REG)
    store = ArtifactStore(cfg.store)

    def manifest_seconds(key):
        return store.get(key).manifest["timings"]["total_s"]

    first = run_prompt(cfg, cfg.prompt, REG, prefect=_StubPrefect(), show_progress=False)
    ((name, params),) = sent
    assert name == "t3d-prompt/gpu" and params["registry"] == "tests.flowstages:REGISTRY"
    assert params["run_id"] == first.run_id
    assert first.state == "failed" and first.failed_stage == "b" and "remote run fake-run" in first.error
    assert [(r.stage, r.state) for r in first.results] == [("a", "computed")]
    assert first.results[0].seconds == manifest_seconds(first.results[0].key)
    assert calls() == ["a", "b"]

    second = run_prompt(cfg, cfg.prompt, REG, prefect=_StubPrefect(), show_progress=False)
    assert second.state == "completed" and second.error is None and second.failed_stage is None
    assert [(r.stage, r.state) for r in second.results] == [("a", "cached"), ("b", "computed"), ("c", "computed")]
    assert second.results[0].seconds == 0.0
    assert [r.seconds for r in second.results[1:]] == [manifest_seconds(r.key) for r in second.results[1:]]
    assert second.results[1].metrics == {"value": 8} and calls() == ["b", "c"]
    record = json.loads((tmp_path / "store" / "runs" / f"{second.run_id}.json").read_text())
    assert record["state"] == "completed" and [r["state"] for r in record["results"]] == [
        "cached",
        "computed",
        "computed",
    ]


def test_a_registry_without_spec_cannot_go_to_prefect(tmp_path, identity_prior):
    from tests.flowstages import REGISTRY

    cfg = cfg_for(tmp_path, identity_prior)
    with pytest.raises(ValueError, match="registry_from_spec"):
        run_prompt(cfg, cfg.prompt, REGISTRY(), prefect=_StubPrefect())
    assert run_prompt(cfg, cfg.prompt, REGISTRY(), use_prefect=False, show_progress=False).state == "completed"


def test_prefect_connects_while_the_prior_loads(tmp_path, calls, identity_prior, monkeypatch):
    """A first run's two waits, Prefect's server start and the prior's load, overlap: each side
    below waits for the other to have started, which a sequential run could never satisfy."""
    import threading

    from t3d import runner

    loading, connecting = threading.Event(), threading.Event()
    overlapped = []

    class Connecting:
        problem = None
        connected_url = None

        def api_url(self):
            connecting.set()
            overlapped.append(("connect", loading.wait(10)))
            return None  # no Prefect: the stages then run here

    def warm(cfg, planned, registry):
        loading.set()
        overlapped.append(("prior", connecting.wait(10)))
        return True

    monkeypatch.setattr(runner, "warm_prior", warm)
    cfg = cfg_for(tmp_path, identity_prior)
    result = run_prompt(cfg, cfg.prompt, REG, show_progress=False, prefect=Connecting())
    assert result.state == "completed" and calls() == ["a", "b", "c"]
    assert sorted(overlapped) == [("connect", True), ("prior", True)]


def test_warm_prior_loads_only_for_a_stage_that_runs_and_needs_it(monkeypatch):
    from types import SimpleNamespace

    from t3d import runner

    loaded = []
    monkeypatch.setattr(runner, "prior_loader", lambda source, device, compute: lambda: loaded.append(source))
    cfg = SimpleNamespace(prior="embedded", device="cpu", compute=None)
    registry = {"coarse": SimpleNamespace(uses_prior=True), "export": SimpleNamespace(uses_prior=False)}
    step = lambda name, needs: SimpleNamespace(name=name, needs_run=needs)  # noqa: E731
    assert runner.warm_prior(cfg, [step("coarse", False), step("export", True)], registry) is False
    assert loaded == []
    assert runner.warm_prior(cfg, [step("coarse", True), step("export", True)], registry) is True
    assert loaded == ["embedded"]
