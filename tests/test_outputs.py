"""Outputs by name: outputs/<slug>/ holds one whole delivery (files + report), swapped in atomically;
best-of-N ranks seeds by the prior's score and delivers the best with every seed beside it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from t3d.flows import outputs
from t3d.flows.best_of_n import rank_runs
from t3d.flows.config import ConfigError, load_config
from t3d.flows.flow import PromptRun
from t3d.runner import StageResult, plan
from t3d.stages import registry_from_env
from t3d.store import ArtifactStore

PROMPT = "a red cube"


def _stage_folder(root: Path, stage: str, files: dict[str, bytes], timings: dict | None = None) -> Path:
    folder = root / f"{stage}-{abs(hash(tuple(files)))}"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "manifest.json").write_text(json.dumps({"timings": timings or {}}))
    return folder


def _run(tmp_path: Path, tag: bytes, state: str = "completed", seed: int = 0) -> PromptRun:
    store = tmp_path / f"store-{tag.decode()}-{seed}"
    coarse = _stage_folder(store, "coarse", {"turntable.png": b"png" + tag, "loss_curve.png": b"curve" + tag})
    export = _stage_folder(
        store,
        "export",
        {
            "a-red-cube.glb": b"glb" + tag,
            "a-red-cube.obj": b"obj" + tag,
            "a-red-cube.mtl": b"mtl",
            "a-red-cube.png": b"texture" + tag,
            "turntable.gif": b"gif" + tag,
            "turntable.png": b"strip" + tag,
        },
        {"total_s": 1.5, "turntable_s": 0.5},
    )
    results = [
        StageResult("coarse", "coarse-aaaa", "computed", 3.0, str(coarse), {"iou": 0.8}),
        StageResult("export", "export-bbbb", "computed", 1.5, str(export), {"iou": 0.9, "files": ["x"]}),
    ]
    return PromptRun(PROMPT, f"run-{seed}", state, results, seed=seed)


@pytest.fixture
def cfg(tmp_path):
    flow = tmp_path / "flows" / "flow.yaml"
    flow.parent.mkdir()
    flow.write_text(f"prompt: {PROMPT}\n")
    return load_config(flow), flow


def test_delivery_lands_next_to_the_flow_file_with_files_previews_and_report(tmp_path, cfg):
    config, flow = cfg
    folder = outputs.deliver(config, _run(tmp_path, b"1"), flow)
    assert folder == (flow.parent / "outputs" / "a-red-cube").resolve()
    assert (folder / "a-red-cube.glb").read_bytes() == b"glb1"
    assert (folder / "a-red-cube.png").read_bytes() == b"texture1"  # the OBJ's texture
    assert (folder / "turntable.gif").read_bytes() == b"gif1"
    assert (folder / "stages" / "coarse" / "loss_curve.png").read_bytes() == b"curve1"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["deliverables"]["glb"] == "a-red-cube.glb"
    assert summary["stages"][1]["timings"] == {"total_s": 1.5, "turntable_s": 0.5}
    assert summary["stages"][0]["curves"] == ["stages/coarse/loss_curve.png"]
    assert summary["stages"][1]["metrics"] == {"iou": 0.9}  # lists stay out of the table
    assert (folder / "report.html").is_file()
    assert [p.name for p in folder.parent.iterdir()] == ["a-red-cube"]  # no staging left behind


def test_out_overrides_and_relative_outputs_key(tmp_path, cfg):
    config, flow = cfg
    assert outputs.outputs_root(config, flow, tmp_path / "elsewhere") == (tmp_path / "elsewhere").resolve()
    moved = config.model_copy(update={"outputs": "../deliveries"})
    assert outputs.outputs_root(moved, flow) == (tmp_path / "deliveries").resolve()


def test_a_rerun_replaces_the_whole_folder(tmp_path, cfg):
    config, flow = cfg
    folder = outputs.deliver(config, _run(tmp_path, b"1"), flow)
    (folder / "stale-by-hand.txt").write_text("from the first delivery")
    again = outputs.deliver(config, _run(tmp_path, b"2"), flow)
    assert again == folder
    assert (folder / "a-red-cube.glb").read_bytes() == b"glb2"
    assert not (folder / "stale-by-hand.txt").exists()


def test_a_crash_mid_delivery_keeps_the_previous_one_whole(tmp_path, cfg, monkeypatch):
    config, flow = cfg
    folder = outputs.deliver(config, _run(tmp_path, b"1"), flow)
    import t3d.report

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(t3d.report, "write_report", broken)
    with pytest.raises(OSError):
        outputs.deliver(config, _run(tmp_path, b"2"), flow)
    assert (folder / "a-red-cube.glb").read_bytes() == b"glb1"
    assert (folder / "report.html").is_file()
    assert [p.name for p in folder.parent.iterdir()] == ["a-red-cube"]


def test_a_failed_run_delivers_nothing(tmp_path, cfg):
    config, flow = cfg
    folder = outputs.deliver(config, _run(tmp_path, b"1"), flow)
    assert outputs.deliver(config, _run(tmp_path, b"2", state="failed"), flow) is None
    assert (folder / "a-red-cube.glb").read_bytes() == b"glb1"


def test_leftovers_of_a_dead_delivery_are_swept(tmp_path, cfg):
    config, flow = cfg
    root = flow.parent / "outputs"
    dead = root / ".a-red-cube.tmp-999999999-abcdef"
    dead.mkdir(parents=True)
    live = root / f".a-red-cube.tmp-{os.getpid()}-abcdef"  # e.g. this process's other thread
    live.mkdir()
    outputs.deliver(config, _run(tmp_path, b"1"), flow)
    assert not dead.exists() and live.exists()


def test_best_of_n_delivers_the_best_seed_with_every_seed_ranked(tmp_path, cfg):
    config, flow = cfg
    runs = {s: _run(tmp_path, str(s).encode(), seed=s) for s in (0, 1, 2)}
    ranked = [(1, runs[1], {"score": 0.5}), (2, runs[2], {"score": 0.2}), (0, runs[0], {"score": -0.1})]
    folder = outputs.deliver(config, runs[1], flow, seeds=ranked)
    assert (folder / "a-red-cube.glb").read_bytes() == b"glb1"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["seed"] == 1
    assert [(s["seed"], s["rank"], s["best"]) for s in summary["seeds"]] == [(1, 1, True), (2, 2, False), (0, 3, False)]
    for s in (0, 1, 2):
        assert (folder / "seeds" / str(s) / "a-red-cube.glb").read_bytes() == f"glb{s}".encode()
        assert (folder / "seeds" / str(s) / "report.html").is_file()
        assert (folder / summary["seeds"][0]["thumb"]).is_file()


def test_rank_runs_orders_by_score_and_puts_failures_last(tmp_path, cfg, monkeypatch):
    config, _ = cfg
    from t3d.flows import best_of_n
    from t3d.mesh.selection import SeedScore

    runs = {s: _run(tmp_path, str(s).encode(), seed=s) for s in (0, 1, 2, 3)}
    runs[2] = _run(tmp_path, b"f", state="failed", seed=2)
    fake = {0: 0.1, 1: 0.7, 3: 0.4}

    def score(_cfg, _prompt, glbs):
        assert sorted(glbs) == [0, 1, 3]  # a failed seed is not scored
        return {s: SeedScore(score=fake[s], err_cond=0.0, err_uncond=0.0, n_evals=1) for s in glbs}

    monkeypatch.setattr(best_of_n, "score_glbs", score)
    ranked = rank_runs(config, PROMPT, runs)
    assert [s for s, _, _ in ranked] == [1, 3, 0, 2]
    assert ranked[0][2]["score"] == 0.7 and ranked[-1][2] == {}


def test_seeds_key_and_its_errors(tmp_path):
    flow = tmp_path / "f.yaml"
    flow.write_text(f"prompt: {PROMPT}\nseed: 5\nseeds: 3\n")
    assert load_config(flow).seed_list() == [5, 6, 7]
    flow.write_text(f"prompt: {PROMPT}\nseeds: [4, 9]\n")
    assert load_config(flow).seed_list() == [4, 9]
    for bad in ("0", "[1, 1]", "[]"):
        flow.write_text(f"prompt: {PROMPT}\nseeds: {bad}\n")
        with pytest.raises(ConfigError, match="seeds"):
            load_config(flow)


def test_seeds_share_encode_prompt_but_not_the_rest(tmp_path):
    flow = tmp_path / "f.yaml"
    flow.write_text(f"prompt: {PROMPT}\n")
    registry = registry_from_env()
    store = ArtifactStore(tmp_path / "store")
    keys = {}
    for seed in (0, 1):
        cfg = load_config(flow, [f"seed={seed}"])
        keys[seed] = {p.name: p.key for p in plan(cfg, PROMPT, registry, store)}
    assert keys[0]["encode_prompt"] == keys[1]["encode_prompt"]
    assert keys[0]["coarse"] != keys[1]["coarse"]


def test_an_unwritable_outputs_folder_stops_the_run_before_it_starts(tmp_path, cfg):
    import subprocess
    import sys

    config, flow = cfg
    assert outputs.check_outputs_root(config, flow) == flow.parent / "outputs"
    assert (flow.parent / "outputs").is_dir() and not list((flow.parent / "outputs").iterdir()), "no probe left"
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError):
        outputs.check_outputs_root(config, flow, a_file)
    proc = subprocess.run(
        [sys.executable, "-m", "t3d.cli.main", "run", str(flow), "--out", str(a_file), "--no-prefect"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: --out: cannot write deliveries there ({a_file} is a file, not a folder)"
    assert "encode_prompt" not in proc.stdout + proc.stderr, "nothing ran"
