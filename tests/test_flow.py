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

    first = run_prompt(cfg, cfg.prompt, REG, show_progress=False)
    assert first.state == "failed" and first.failed_stage == "b" and "failed on purpose" in first.error
    assert calls() == ["a", "b"]
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
