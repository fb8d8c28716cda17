"""Artifact store: round trip, tamper detection, atomic commit, remote (fsspec) stores."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from t3d.store import ArtifactCorrupt, ArtifactStore, artifact_key

# gc only collects names of the form artifact_key() makes: <stage>-<20 hex>
KEY1, KEY2 = "x-" + "1" * 20, "x-" + "2" * 20


def _write(store, key, payload=b"hello", name="data.bin"):
    with store.writer(key, {"stage": "x", "params": {"a": 1}}) as out:
        (out / name).write_bytes(payload)
        (out / "sub").mkdir()
        (out / "sub" / "more.txt").write_text("more")


def test_key_depends_on_every_ingredient():
    base = dict(stage="s", version="1", params={"a": 1}, seed=0, inputs={"u": "u-1"}, prior="p")
    k = artifact_key(**base)
    assert k.startswith("s-") and k == artifact_key(**base)
    for change in ({"version": "2"}, {"params": {"a": 2}}, {"seed": 1}, {"inputs": {"u": "u-2"}}, {"prior": "q"}):
        assert artifact_key(**{**base, **change}) != k, change
    assert artifact_key(**base, context={"prompt": "a"}) != artifact_key(**base, context={"prompt": "b"})


@pytest.mark.parametrize("kind", ["local", "file", "memory"])
def test_round_trip(tmp_path, kind):
    uri = {"local": str(tmp_path / "a"), "file": f"file://{tmp_path}/b", "memory": f"memory://t3d-{uuid.uuid4().hex}"}[
        kind
    ]
    store = ArtifactStore(uri, cache_dir=tmp_path / "cache")
    _write(store, "x-1")
    assert store.status("x-1") == "complete" and store.keys() == ["x-1"]
    art = store.get("x-1")
    assert (art.path / "data.bin").read_bytes() == b"hello"
    assert (art.path / "sub" / "more.txt").read_text() == "more"
    assert set(art.manifest["files"]) == {"data.bin", "sub/more.txt"}
    assert art.manifest["params"] == {"a": 1} and art.manifest["key"] == "x-1"


def test_tampered_file_is_detected_and_recomputable(tmp_path):
    store = ArtifactStore(tmp_path)
    _write(store, "x-1")
    (tmp_path / "objects" / "x-1" / "data.bin").write_bytes(b"HELLO")
    assert store.status("x-1").startswith("corrupt")
    with pytest.raises(ArtifactCorrupt, match="data.bin"):
        store.get("x-1")
    _write(store, "x-1", b"again")  # recompute over it
    assert store.get("x-1").path.joinpath("data.bin").read_bytes() == b"again"


def test_missing_file_and_bad_manifest_are_corrupt(tmp_path):
    store = ArtifactStore(tmp_path)
    _write(store, "x-1")
    (tmp_path / "objects" / "x-1" / "sub" / "more.txt").unlink()
    assert "missing" in store.status("x-1")
    _write(store, "x-2")
    (tmp_path / "objects" / "x-2" / "manifest.json").write_text("{not json")
    assert store.status("x-2").startswith("corrupt")


def test_exception_in_writer_commits_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.writer("x-1", {}) as out:
            (out / "half.bin").write_bytes(b"half")
            raise RuntimeError("boom")
    assert store.status("x-1") == "missing" and store.keys() == []
    assert not any((tmp_path / ".tmp").iterdir())


def test_process_killed_midway_leaves_nothing_reusable(tmp_path):
    script = textwrap.dedent(
        f"""
        import os
        from t3d.store import ArtifactStore
        store = ArtifactStore({str(tmp_path)!r})
        with store.writer("x-1", {{}}) as out:
            (out / "half.bin").write_bytes(b"half")
            os._exit(9)  # killed: no cleanup, no commit
        """
    )
    proc = subprocess.run([sys.executable, "-c", script.replace("x-1", KEY1)])
    assert proc.returncode == 9
    store = ArtifactStore(tmp_path)
    assert store.status(KEY1) == "missing"
    orphans = [p.name for p in (tmp_path / ".tmp").iterdir()]
    assert len(orphans) == 1 and orphans[0].startswith(KEY1 + "-"), "the orphan temp folder is left for gc"
    assert store.gc(min_age_s=0) == [f".tmp/{orphans[0]}"]
    assert not list((tmp_path / ".tmp").iterdir())


def test_remote_partial_upload_is_not_used(tmp_path):
    uri = f"memory://t3d-{uuid.uuid4().hex}"
    store = ArtifactStore(uri, cache_dir=tmp_path)
    _write(store, "x-1")
    store.fs.rm(f"{store.root}/objects/x-1/manifest.json")  # as if the upload died before the manifest
    assert store.status("x-1").startswith("corrupt")
    with pytest.raises(ArtifactCorrupt, match="no manifest"):
        store.get("x-1")


def test_remote_cache_is_reverified(tmp_path):
    store = ArtifactStore(f"memory://t3d-{uuid.uuid4().hex}", cache_dir=tmp_path)
    _write(store, "x-1")
    local = store.get("x-1").path
    (local / "data.bin").write_bytes(b"tampered locally")
    assert (store.get("x-1").path / "data.bin").read_bytes() == b"hello"


def test_gc_keeps_referenced_artifacts(tmp_path):
    store = ArtifactStore(tmp_path)
    _write(store, KEY1)
    _write(store, KEY2)
    store.record_run("r1", {"stages": {"x": KEY1}})
    assert store.gc(dry_run=True) == [f"objects/{KEY2}"] and store.keys() == [KEY1, KEY2]
    assert store.gc() == [f"objects/{KEY2}"] and store.keys() == [KEY1]
    assert json.loads((tmp_path / "runs" / "r1.json").read_text())["stages"] == {"x": KEY1}


def test_stage_may_not_write_its_own_manifest(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(ValueError, match="manifest"):
        with store.writer("x-1", {}) as out:
            (out / "manifest.json").write_text("{}")
    assert store.status("x-1") == "missing"


def test_claim_makes_a_second_writer_wait_and_reuse(tmp_path):
    """Two runs needing the same missing artifact: the second waits and reuses, never writes twice."""
    import threading

    store = ArtifactStore(tmp_path)
    order = []
    first_holds = threading.Event()

    def first():
        with store.claim("x-1") as compute:
            order.append(("first", compute))
            first_holds.set()
            time.sleep(0.6)
            _write(store, "x-1")

    t = threading.Thread(target=first)
    t.start()
    first_holds.wait(5)
    with ArtifactStore(tmp_path).claim("x-1", poll_s=0.05) as compute:
        order.append(("second", compute))
    t.join()
    assert order == [("first", True), ("second", False)]
    assert not (tmp_path / "locks" / "x-1.lock").exists()


def test_stale_lock_of_dead_process_is_broken(tmp_path):
    store = ArtifactStore(tmp_path)
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    (tmp_path / "locks").mkdir()
    import socket

    (tmp_path / "locks" / "x-1.lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead_pid, "token": "t"})
    )
    with store.claim("x-1", poll_s=0.01, timeout_s=5) as compute:
        assert compute is True


# ---- compute: the whole claim / write / commit / verify operation in one call --------------------
def _compute_value(store, key, value, calls, inputs=None, force=False, fail=False):
    def fn(work):
        calls.append(
            {"inputs": dict(work.inputs), "checkpoint_files": sorted(p.name for p in work.checkpoints.iterdir())}
        )
        assert store.claim_is_live(key), "fn runs under the key's claim"
        (work.checkpoints / "step.txt").write_text(str(value))
        if fail:
            raise RuntimeError("stage crashed")
        (work.out / "value.txt").write_text(str(value))
        return {"metrics": {"value": value}}

    return store.compute(key, {"stage": "x"}, fn, inputs=inputs, force=force)


def test_compute_commits_verifies_and_drops_checkpoints(tmp_path):
    store = ArtifactStore(tmp_path)
    calls: list = []
    done = _compute_value(store, KEY1, 7, calls)
    assert not done.meanwhile and calls == [{"inputs": {}, "checkpoint_files": []}]
    assert (done.artifact.path / "value.txt").read_text() == "7"
    assert done.artifact.manifest["metrics"] == {"value": 7} and done.artifact.manifest["stage"] == "x"
    assert store.status(KEY1) == "complete"
    assert not (tmp_path / "checkpoints" / KEY1).exists(), "a committed key keeps no checkpoint"
    assert not (tmp_path / "locks" / f"{KEY1}.lock").exists(), "the claim is released"
    assert list((tmp_path / ".tmp").iterdir()) == [], "no temp folder is left"


def test_compute_failure_commits_nothing_and_keeps_checkpoints_for_the_retry(tmp_path):
    store = ArtifactStore(tmp_path)
    calls: list = []
    with pytest.raises(RuntimeError, match="stage crashed"):
        _compute_value(store, KEY1, 1, calls, fail=True)
    assert store.status(KEY1) == "missing" and not (tmp_path / "locks" / f"{KEY1}.lock").exists()
    assert (tmp_path / "checkpoints" / KEY1 / "step.txt").read_text() == "1"
    _compute_value(store, KEY1, 2, calls)
    assert calls[-1]["checkpoint_files"] == ["step.txt"], "the retry resumes from the failed run's checkpoint"


def test_compute_reuses_what_another_run_committed_unless_forced(tmp_path):
    store = ArtifactStore(tmp_path)
    calls: list = []
    _compute_value(store, KEY1, 1, calls)
    again = _compute_value(store, KEY1, 2, calls)
    assert again.meanwhile and len(calls) == 1 and (again.artifact.path / "value.txt").read_text() == "1"
    (tmp_path / "checkpoints" / KEY1).mkdir(parents=True)
    (tmp_path / "checkpoints" / KEY1 / "old.txt").write_text("left beside a finished artifact")
    forced = _compute_value(store, KEY1, 3, calls, force=True)
    assert not forced.meanwhile and (forced.artifact.path / "value.txt").read_text() == "3"
    assert calls[-1]["checkpoint_files"] == [], "a forced recompute of a committed key starts from no checkpoint"


def test_compute_hands_verified_inputs_and_names_a_corrupt_one(tmp_path):
    from t3d.store import InputCorrupt

    store = ArtifactStore(tmp_path)
    calls: list = []
    _write(store, KEY2)
    _compute_value(store, KEY1, 1, calls, inputs={"up": KEY2})
    assert calls[-1]["inputs"] == {"up": store.local_path(KEY2)}
    (tmp_path / "objects" / KEY2 / "data.bin").write_bytes(b"tampered")
    with pytest.raises(InputCorrupt, match="data.bin") as caught:
        _compute_value(store, "x-" + "3" * 20, 1, calls, inputs={"up": KEY2})
    assert caught.value.name == "up" and caught.value.key == KEY2
    assert len(calls) == 1 and store.status("x-" + "3" * 20) == "missing"


def test_compute_on_a_remote_store_syncs_checkpoints_and_drops_them_on_commit(tmp_path):
    store = ArtifactStore(f"memory://t3d-{uuid.uuid4().hex}", cache_dir=tmp_path / "cache")

    def fn(work):
        (work.checkpoints / "state.json").write_text(json.dumps({"step": 4}))
        work.sync_checkpoint()
        assert store.fs.exists(f"{store.root}/checkpoints/{KEY1}/index.json"), "synced into the store"
        (work.out / "value.txt").write_text("ok")

    done = store.compute(KEY1, {"stage": "x"}, fn)
    assert (done.artifact.path / "value.txt").read_text() == "ok"
    assert not store.fs.exists(f"{store.root}/checkpoints/{KEY1}")
    assert not (store.local_root / "checkpoints" / KEY1).exists()
