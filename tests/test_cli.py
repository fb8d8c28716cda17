"""The CLI's own commands in-process: run --no-prefect, show, ls, gc, doctor, bad input."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from t3d.cli.main import app

runner = CliRunner()


def _flow(tmp_path, extra=""):
    path = tmp_path / "flow.yaml"
    path.write_text(f"prompt: a red cube\nprior: tiny-pixel\nstore: ./store\n{extra}")
    return path


def test_run_show_ls_gc(tmp_path, monkeypatch):
    monkeypatch.setenv("T3D_STAGE_REGISTRY", "tests.flowstages:REGISTRY")
    flow = _flow(tmp_path)
    res = runner.invoke(app, ["run", str(flow), "--no-prefect"])
    assert res.exit_code == 0, res.output
    store = str(tmp_path / "store")
    run_record = json.loads(next((tmp_path / "store" / "runs").glob("*.json")).read_text())
    key_b = run_record["stages"]["b"]
    shown = runner.invoke(app, ["show", key_b[:8], "--store", store])
    assert shown.exit_code == 0, shown.output
    manifest = json.loads(shown.stdout)
    assert manifest["stage"] == "b" and manifest["params"] == {"factor": 2} and manifest["metrics"] == {"value": 6}
    assert manifest["inputs"] == {"a": run_record["stages"]["a"]} and "value.json" in manifest["files"]

    # A changed param makes a new run record? No: same flow file -> same record, now pointing at the new key.
    res = runner.invoke(app, ["run", str(flow), "--no-prefect", "--set", "stages.c.offset=4"])
    assert res.exit_code == 0, res.output
    listed = runner.invoke(app, ["ls", "--store", store])
    assert "a red cube" in listed.stdout and "1 unreferenced" in listed.stdout
    gone = runner.invoke(app, ["gc", "--store", store])
    assert gone.exit_code == 0 and "removed 1 item(s)" in gone.stdout and "objects/c-" in gone.stdout

    missing = runner.invoke(app, ["show", "zzz", "--store", store])
    assert missing.exit_code == 2


def test_bad_input_exits_2_with_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("T3D_STAGE_REGISTRY", "tests.flowstages:REGISTRY")
    res = runner.invoke(app, ["run", str(_flow(tmp_path, "stages:\n  b: {factor: two}\n")), "--no-prefect"])
    assert res.exit_code == 2 and "stages.b.factor" in res.output
    res = runner.invoke(app, ["run", str(_flow(tmp_path)), "--no-prefect", "--from", "zz"])
    assert res.exit_code == 2 and "--from zz" in res.output
    res = runner.invoke(app, ["run", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "no such file" in res.output


def test_doctor_reports_every_component():
    res = runner.invoke(app, ["doctor"])
    assert res.exit_code == 0, res.output
    for name in ("torch", "CUDA", "tinycudann", "nvdiffrast", "Prefect API", "embedded prior"):
        assert name in res.stdout
