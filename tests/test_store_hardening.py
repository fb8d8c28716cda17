"""Issue #12: manifests that escape, trusted empty manifests, prior classes named by a file, file
modes, gc that deletes what it did not create, claims on slow object stores, checkpoints that stay
on one machine, artifacts that pin a backend, undeclared imports."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import socket
import stat
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from safetensors.torch import save_file

from t3d.backends import BackendsParams
from t3d.render.cameras import CameraParams
from t3d.stage import Stage, StageParams, load_checkpoint, save_checkpoint
from t3d.store import ArtifactCorrupt, ArtifactStore, check_manifest_path, current_umask, files_digest
from tests.contexts import stage_context

ROOT = Path(__file__).resolve().parents[1]
K1, K2, K3, K4 = (f"x-{c * 20}" for c in "1234")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(store: ArtifactStore, key: str, payload: bytes = b"hello") -> None:
    with store.writer(key, {"stage": "x"}) as out:
        (out / "data.bin").write_bytes(payload)


def _edit_manifest(store: ArtifactStore, key: str, **changes) -> dict:
    path = f"{store.root}/objects/{key}/manifest.json"
    manifest = json.loads(store.fs.cat_file(path))
    manifest.update(changes)
    store.fs.pipe_file(path, json.dumps(manifest).encode())
    return manifest


def _memory_uri() -> str:
    return f"memory://t3d-{uuid.uuid4().hex}"


# ---- manifests ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rel",
    [
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a/..",
        "..",
        "a\\..\\..\\x",
        "..\\x",
        "",
        "a//b",
        "./a",
        "a/./b",
        "a/",
        "C:/x",
        "c:x",
        "memory://x",
        "x\x00y",
        "x\ny",
        "manifest.json",
        3,
        None,
    ],
)
def test_manifest_path_validator_rejects(rel):
    with pytest.raises(ArtifactCorrupt) as e:
        check_manifest_path(K1, rel)
    msg = str(e.value)
    assert msg.startswith(f"{K1}: manifest entry {rel!r}") and "\n" not in msg


@pytest.mark.parametrize(
    "rel", ["field.safetensors", "sub/more.txt", "..hidden", "a..b/c", "particle_0/field.json", "x y.png"]
)
def test_manifest_path_validator_accepts(rel):
    assert check_manifest_path(K1, rel) == rel


def _escape_store(kind: str, tmp_path: Path) -> tuple[ArtifactStore, Path]:
    """A remote store whose manifest names ../../../../escaped.txt, with the bytes it lists really at
    that store path, so only the path check stops get(). Returns (store, where the escape would land)."""
    cache = tmp_path / "deep" / "cache"
    if kind == "memory":
        store = ArtifactStore(_memory_uri(), cache_dir=cache)
    else:
        store = ArtifactStore(f"simplecache::file://{tmp_path}/r1/r2/store", cache_dir=cache)
    assert not store.is_local
    _write(store, K1)
    evil = "../../../../escaped.txt"
    payload = b"written by a manifest from a shared bucket"
    store.fs.makedirs(f"{store.root}/objects/{K1}", exist_ok=True)
    store.fs.pipe_file(f"{store.root}/objects/{K1}/{evil}", payload)
    files = {"data.bin": _sha(b"hello"), evil: _sha(payload)}
    _edit_manifest(store, K1, files=files, file_count=2, files_digest=files_digest(files))
    # get() downloads into <cache>/store-<slug>/.tmp/dl-<key>-<hex>/; four levels up is <cache>/..
    return store, cache.parent / "escaped.txt"


@pytest.mark.parametrize("kind", ["memory", "simplecache"])
def test_remote_manifest_cannot_write_outside_the_store(tmp_path, kind):
    store, landing = _escape_store(kind, tmp_path)
    assert store.fs.exists(f"{store.root}/objects/{K1}/../../../../escaped.txt")
    with pytest.raises(ArtifactCorrupt, match=r"escaped\.txt.*'\.\.' segment"):
        store.get(K1)
    assert store.status(K1).startswith("corrupt:")
    assert not landing.exists()
    assert [
        p for p in tmp_path.rglob("escaped.txt") if "r1" not in p.parts
    ] == []  # simplecache: r1/ holds the planted file


def test_local_store_rejects_escaping_entries_and_symlinks(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"secret")
    _write(store, K1)
    files = {"../../secret.txt": _sha(b"secret")}
    _edit_manifest(store, K1, files=files, file_count=1, files_digest=files_digest(files))
    with pytest.raises(ArtifactCorrupt, match=r"'\.\./\.\./secret\.txt' has an empty, '\.' or '\.\.' segment"):
        store.verify(K1)
    # A symlink inside the artifact folder that points out of it (hash matches) is refused too.
    _write(store, K2)
    art = tmp_path / "store" / "objects" / K2
    (art / "link.bin").symlink_to(outside)
    files = {"data.bin": _sha(b"hello"), "link.bin": _sha(b"secret")}
    _edit_manifest(store, K2, files=files, file_count=2, files_digest=files_digest(files))
    with pytest.raises(ArtifactCorrupt, match="'link.bin' resolves outside the artifact folder"):
        store.get(K2)


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_empty_or_edited_file_list_is_not_trusted(tmp_path, kind):
    store = ArtifactStore(tmp_path / "s" if kind == "local" else _memory_uri(), cache_dir=tmp_path / "c")
    _write(store, K1)
    manifest = store.verify(K1)
    assert manifest["file_count"] == 1 and manifest["files_digest"] == files_digest({"data.bin": _sha(b"hello")})

    _edit_manifest(store, K1, files={})
    assert store.status(K1) == f"corrupt: {K1}: manifest lists no files (every artifact has at least one)"
    # Older manifests (no file_count / files_digest) are still checked for an empty list.
    path = f"{store.root}/objects/{K1}/manifest.json"
    bare = {k: v for k, v in json.loads(store.fs.cat_file(path)).items() if k not in ("file_count", "files_digest")}
    store.fs.pipe_file(path, json.dumps(bare).encode())
    assert "lists no files" in store.status(K1)

    with store.writer(K2, {}) as out:
        (out / "a.bin").write_bytes(b"a")
        (out / "b.bin").write_bytes(b"b")
    _edit_manifest(store, K2, files={"a.bin": _sha(b"a")})  # b.bin dropped from the list
    assert "file_count says 2" in store.status(K2)
    _edit_manifest(store, K2, files={"a.bin": _sha(b"a")}, file_count=1)
    assert "does not match its files_digest" in store.status(K2)
    _edit_manifest(store, K2, files={"a.bin": "abc"}, file_count=1, files_digest=files_digest({"a.bin": "abc"}))
    assert "has no valid sha256" in store.status(K2)
    store.fs.pipe_file(f"{store.root}/objects/{K2}/manifest.json", b"[1, 2]")
    assert store.status(K2) == f"corrupt: {K2}: manifest.json is not a JSON object"
    store.fs.pipe_file(f"{store.root}/objects/{K2}/manifest.json", b"\xff\xfe{")
    assert "manifest.json is not valid JSON" in store.status(K2)


def test_writer_refuses_an_artifact_without_files(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(ValueError, match="wrote no files"):
        with store.writer(K1, {}) as out:
            (out / "empty_dir").mkdir()
    assert store.status(K1) == "missing" and store.keys() == []


# ---- file modes -----------------------------------------------------------------------------------
@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(value: int) -> None:
        os.umask(value)

    yield set_
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_store_files_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    store = ArtifactStore(tmp_path / "store")
    with store.writer(K1, {}) as out:
        save_file({"w": torch.zeros(3)}, str(out / "field.safetensors"))  # safetensors makes 0600 files
        assert _mode(out / "field.safetensors") == 0o600
        (out / "sub").mkdir(mode=0o700)
        (out / "sub" / "x.json").write_text("{}")
    art = store.get(K1).path
    for rel in ("field.safetensors", "sub/x.json", "manifest.json"):
        assert _mode(art / rel) == 0o666 & ~mask, rel
    assert _mode(art) == _mode(art / "sub") == 0o777 & ~mask
    with store.claim(K2):
        assert _mode(tmp_path / "store" / "locks" / f"{K2}.lock") == 0o666 & ~mask
    ckpt = store.checkpoint_dir(K3)
    save_checkpoint(ckpt, 1, {"w": torch.ones(2)})
    assert _mode(ckpt / "state.safetensors") == _mode(ckpt / "state.json") == 0o666 & ~mask
    # A remote store's downloaded copy follows the umask as well.
    remote = ArtifactStore(_memory_uri(), cache_dir=tmp_path / "cache")
    with remote.writer(K1, {}) as out:
        save_file({"w": torch.zeros(3)}, str(out / "field.safetensors"))
    assert not remote.local_path(K1).exists()
    assert _mode(remote.get(K1).path / "field.safetensors") == 0o666 & ~mask


# ---- gc ---------------------------------------------------------------------------------------------
def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (old, old))


def test_gc_deletes_only_what_the_store_created(tmp_path):
    store = ArtifactStore(tmp_path)
    _write(store, K1)
    foreign = {
        "objects/notes.txt": "mine",
        "objects/Backup-11111111111111111111/keep.txt": "mine",
        "objects/x-123/keep.txt": "mine",
        "checkpoints/my-experiment/w.bin": "mine",
        "checkpoints/x-1111111111111111111g/w.bin": "mine",
        ".tmp/scratch/w.bin": "mine",
        f".tmp/{K2}-nothex!!/w.bin": "mine",
        f".tmp/other-{K2}-0123abcd/w.bin": "mine",
    }
    for rel, text in foreign.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    orphan = tmp_path / ".tmp" / f"{K2}-0123abcd"
    (orphan / "half.bin").parent.mkdir(parents=True)
    (orphan / "half.bin").write_bytes(b"half")
    _age(tmp_path / ".tmp", 7200)
    removed = store.gc()
    assert removed == [f"objects/{K1}", f".tmp/{K2}-0123abcd"]
    for rel in foreign:
        assert (tmp_path / rel).read_text() == "mine", rel
    assert not orphan.exists() and store.keys() == sorted(["notes.txt", "Backup-11111111111111111111", "x-123"])


def test_gc_dry_run_lists_exactly_what_a_real_run_deletes(tmp_path):
    store = ArtifactStore(tmp_path)
    _write(store, K1)  # referenced, complete
    _write(store, K2)  # unreferenced
    store.record_run("r", {"stages": {"a": K1, "b": K3}})  # K3: referenced, not finished yet
    for key in (K1, K3, K4):
        save_checkpoint(store.checkpoint_dir(key), 2, {"w": torch.ones(1)})
    for name in (f"{K3}-0000aaaa", f"dl-{K1}-0000bbbb", f"trash-{K2}-0000cccc", f"ckpt-{K3}-0000dddd"):
        (tmp_path / ".tmp" / name).mkdir(parents=True)
        (tmp_path / ".tmp" / name / "f").write_text("x")
    fresh = tmp_path / ".tmp" / f"{K4}-0000eeee"  # a young temp folder: kept
    fresh.mkdir()
    _age(tmp_path / ".tmp", 7200)
    (fresh / "f").write_text("x")
    expected = [
        f"objects/{K2}",
        f"checkpoints/{K1}",  # its artifact is committed
        f"checkpoints/{K4}",  # no run references it
        f".tmp/ckpt-{K3}-0000dddd",
        f".tmp/dl-{K1}-0000bbbb",
        f".tmp/trash-{K2}-0000cccc",
        f".tmp/{K3}-0000aaaa",
    ]
    snapshot = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert store.gc(dry_run=True) == expected
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == snapshot, "dry run deleted something"
    assert store.gc() == expected
    for rel in expected:
        assert not (tmp_path / rel).exists(), rel
    assert (tmp_path / "checkpoints" / K3 / "state.json").exists(), (
        "the resume state of an unfinished referenced key is kept"
    )
    assert fresh.exists() and store.keys() == [K1]
    assert store.gc(dry_run=True) == []


def test_gc_skips_keys_with_a_live_claim(tmp_path):
    store = ArtifactStore(tmp_path)
    _write(store, K1)  # unreferenced: gc fodder, except while someone recomputes it
    running = tmp_path / ".tmp" / f"{K1}-0000aaaa"  # a stage that has been running for two hours
    (running / "out.bin").parent.mkdir(parents=True)
    (running / "out.bin").write_bytes(b"partial")
    _age(running, 7200)
    save_checkpoint(store.checkpoint_dir(K1), 5, {"w": torch.ones(1)})
    with store.claim(K1, stale_s=60.0):
        assert store.claim_is_live(K1)
        assert store.gc(dry_run=True) == [] and store.gc(min_age_s=0) == []
        assert running.exists() and (tmp_path / "checkpoints" / K1).exists() and store.keys() == [K1]
    # A claim whose holder died is not live.
    (tmp_path / "locks" / f"{K1}.lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "token": "t"})
    )
    assert not store.claim_is_live(K1)
    assert store.gc() == [f"objects/{K1}", f"checkpoints/{K1}", f".tmp/{K1}-0000aaaa"]


def _dead_pid() -> int:
    import subprocess

    return int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )


def test_gc_on_a_remote_store_names_store_and_cache_entries(tmp_path):
    store = ArtifactStore(_memory_uri(), cache_dir=tmp_path)
    _write(store, K1)
    store.get(K1)  # cached copy
    save_checkpoint(store.checkpoint_dir(K2), 3, {"w": torch.ones(1)})
    store.sync_checkpoint(K2)
    assert store.fs.exists(f"{store.root}/checkpoints/{K2}/index.json")
    removed = store.gc()
    assert removed == [f"objects/{K1}", f"checkpoints/{K2}", f"cache:checkpoints/{K2}"]
    assert store.keys() == [] and not store.local_path(K1).exists()
    assert (
        not store.fs.exists(f"{store.root}/checkpoints/{K2}") and not (store.local_root / "checkpoints" / K2).exists()
    )


# ---- claims on object stores ------------------------------------------------------------------------
class SlowObjectStore(MemoryFileSystem):
    """An in-memory object store whose PUTs take a per-thread time to land (`delay.s`), applied
    atomically when they land; "xb" is a conditional PUT (If-None-Match: *) checked at that moment."""

    protocol = "t3dslow"
    store: dict = {}
    pseudo_dirs = [""]
    delay = threading.local()
    _apply = threading.Lock()

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if mode not in ("wb", "xb"):
            return super()._open(path, mode, block_size, autocommit, cache_options, **kwargs)
        fs, path = self, self._strip_protocol(path)
        exclusive = self._exclusive(mode)

        class Put(MemoryFile):
            landed = False

            def close(self):  # once: __exit__ closes it, garbage collection calls close() again
                if self.landed:
                    return
                self.landed = True
                data = self.getvalue()
                time.sleep(getattr(fs.delay, "s", 0.0))
                with fs._apply:
                    if exclusive and path in fs.store:
                        raise FileExistsError(path)
                    fs.store[path] = MemoryFile(fs, path, data)

            def commit(self):
                pass

        return Put(None, path)

    def _exclusive(self, mode: str) -> bool:
        return mode == "xb"


class SlowObjectStoreWithoutExclusive(SlowObjectStore):
    """Like fsspec's generic buffered file: accepts "xb" and overwrites anyway."""

    protocol = "t3dslownox"
    store: dict = {}
    pseudo_dirs = [""]

    def _exclusive(self, mode: str) -> bool:
        return False


fsspec.register_implementation("t3dslow", SlowObjectStore, clobber=True)
fsspec.register_implementation("t3dslownox", SlowObjectStoreWithoutExclusive, clobber=True)


def _race(store: ArtifactStore, key: str, delays: tuple[float, float], start_gap: float = 0.05) -> list[bool]:
    """Two claimers on separate threads (the second starts start_gap later); whether each won."""
    wins: list = [None, None]

    def claimer(i: int) -> None:
        store.fs.delay.s = delays[i]
        wins[i] = store._try_lock(key, {"host": f"h{i}", "pid": 1, "token": f"tok{i}"})

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(2)]
    threads[0].start()
    time.sleep(start_gap)
    threads[1].start()
    for t in threads:
        t.join(30)
    return wins


def test_memory_filesystem_honours_exclusive_create():
    store = ArtifactStore(_memory_uri())
    assert store._supports_exclusive_create() is True


@pytest.mark.parametrize("delays", [(0.3, 0.0), (0.2, 0.2), (0.0, 0.3)])
def test_exclusive_create_claim_has_one_winner_under_latency(delays):
    store = ArtifactStore(f"t3dslow://bucket-{uuid.uuid4().hex}")
    assert store._supports_exclusive_create() is True
    wins = _race(store, K1, delays)
    assert sorted(wins) == [False, True], wins
    owner = json.loads(store.fs.cat_file(store._lock(K1)))
    assert owner["token"] == f"tok{wins.index(True)}"


def test_write_read_back_fallback_needs_a_settle_time_above_the_latency():
    store = ArtifactStore(f"t3dslownox://bucket-{uuid.uuid4().hex}")
    assert store._supports_exclusive_create() is False  # "xb" accepted but not exclusive: detected
    # The first claimer's PUT takes 0.6 s to land; the second's lands at once. With the old 50 ms
    # settle time both read back their own token: two writers.
    store.CLAIM_SETTLE_S = 0.05
    assert _race(store, K1, (0.6, 0.0)) == [True, True]
    store.CLAIM_SETTLE_S = 1.0
    wins = _race(store, K2, (0.6, 0.0))
    assert sorted(wins) == [False, True], wins
    assert ArtifactStore.CLAIM_SETTLE_S >= 1.0


def test_claim_context_on_a_slow_object_store_is_exclusive():
    store = ArtifactStore(f"t3dslow://bucket-{uuid.uuid4().hex}")
    inside, overlap = [], []

    def worker(i: int) -> None:
        store.fs.delay.s = 0.15
        with store.claim(K1, poll_s=0.02, timeout_s=20):
            inside.append(i)
            if len(inside) > 1:
                overlap.append(tuple(inside))
            time.sleep(0.2)
            inside.remove(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert overlap == [] and inside == []


def test_heartbeat_keeps_an_object_store_claim_live():
    """fsspec's touch(truncate=False) is not implemented on object stores: the old heartbeat never
    refreshed the lock, so a healthy holder looked stale after stale_s and another run broke in."""
    store = ArtifactStore(_memory_uri())
    with store.claim(K1, stale_s=0.4):
        time.sleep(1.0)
        assert store.claim_is_live(K1, stale_s=0.4)
        with pytest.raises(TimeoutError):
            with ArtifactStore(store.uri).claim(K1, poll_s=0.05, stale_s=0.4, timeout_s=0.6):
                pass
    assert not store.fs.exists(store._lock(K1))


# ---- checkpoints in the store -------------------------------------------------------------------------
def test_checkpoint_synced_to_a_remote_store_resumes_on_another_machine(tmp_path):
    uri = _memory_uri()
    a = ArtifactStore(uri, cache_dir=tmp_path / "machine-a")
    folder = a.checkpoint_dir(K1)
    ctx = stage_context(tmp_path, "x", key=K1, checkpoint_dir=folder, checkpoint_sync=lambda: a.sync_checkpoint(K1))
    ctx.save_checkpoint(4, {"w": torch.arange(3.0)}, {"note": "four"})
    ctx.save_checkpoint(7, {"w": torch.arange(3.0) * 7}, {"note": "seven"})
    blobs = a.fs.ls(f"{a.root}/checkpoints/{K1}/blobs", detail=False)
    assert len(blobs) == 2, "the step-4 blobs are gone once the step-7 index is written"

    b = ArtifactStore(uri, cache_dir=tmp_path / "machine-b")
    step, tensors, meta = load_checkpoint(b.checkpoint_dir(K1))
    assert step == 7 and meta == {"note": "seven"}
    torch.testing.assert_close(tensors["w"], torch.arange(3.0) * 7)
    # A local checkpoint that is as new as the store's is kept; an older one is replaced.
    save_checkpoint(b.checkpoint_dir(K1), 9, {"w": torch.zeros(1)})
    assert load_checkpoint(b.checkpoint_dir(K1))[0] == 9
    c = ArtifactStore(uri, cache_dir=tmp_path / "machine-c")
    save_checkpoint(c.local_root / "checkpoints" / K1, 2, {"w": torch.zeros(1)})
    assert load_checkpoint(c.checkpoint_dir(K1))[0] == 7
    # Committing the artifact drops the store's checkpoint.
    with b.writer(K1, {}) as out:
        (out / "done.txt").write_text("done")
    assert not b.fs.exists(f"{b.root}/checkpoints/{K1}")


def test_a_tampered_or_escaping_checkpoint_index_is_ignored(tmp_path, caplog):
    uri = _memory_uri()
    a = ArtifactStore(uri, cache_dir=tmp_path / "a")
    save_checkpoint(a.checkpoint_dir(K1), 3, {"w": torch.ones(2)})
    a.sync_checkpoint(K1)
    index_path = f"{a.root}/checkpoints/{K1}/index.json"
    index = json.loads(a.fs.cat_file(index_path))
    blob = next(iter(index["files"].values()))
    a.fs.pipe_file(f"{a.root}/checkpoints/{K1}/blobs/{blob}", b"garbage")
    b = ArtifactStore(uri, cache_dir=tmp_path / "b")
    with caplog.at_level(logging.WARNING, logger="t3d.store"):
        assert load_checkpoint(b.checkpoint_dir(K1)) is None
    assert "does not match its sha256" in caplog.text
    index["files"] = {"../../../../evil.txt": blob}
    a.fs.pipe_file(index_path, json.dumps(index).encode())
    c = ArtifactStore(uri, cache_dir=tmp_path / "deep" / "c")
    assert list(c.checkpoint_dir(K1).iterdir()) == []
    assert not list(tmp_path.rglob("evil.txt"))


@pytest.mark.parametrize("damage", ["truncate-tensors", "garbage-json", "json-without-step"])
def test_corrupt_checkpoint_restarts_the_stage_instead_of_blocking_it(tmp_path, caplog, damage):
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, 5, {"w": torch.arange(1000.0)}, {"a": 1})
    t, m = folder / "state.safetensors", folder / "state.json"
    if damage == "truncate-tensors":
        t.write_bytes(t.read_bytes()[:100])
        bad = t
    elif damage == "garbage-json":
        m.write_bytes(b"\xff\x00{")
        bad = m
    else:
        m.write_text(json.dumps({"meta": {}}))
        bad = m
    with caplog.at_level(logging.WARNING, logger="t3d.stage"):
        assert load_checkpoint(folder) is None
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and str(bad) in lines[0] and "\n" not in lines[0]
    assert not t.exists() and not m.exists()
    assert load_checkpoint(folder) is None  # and the next attempt starts clean, without a warning
    save_checkpoint(folder, 1, {"w": torch.ones(1)})
    assert load_checkpoint(folder)[0] == 1


class CkParams(StageParams):
    steps: int = 6


CALLS: list[int] = []


def _run_ck(ctx) -> None:
    resumed = ctx.load_checkpoint()
    start = resumed[0] if resumed else 0
    CALLS.append(start)
    for step in range(start, ctx.params.steps):
        if step == 3 and os.environ.get("T3D_TEST_CK_FAIL"):
            raise RuntimeError("worker lost")
        ctx.save_checkpoint(step + 1, {"w": torch.tensor([float(step + 1)])})
    (ctx.out / "done.json").write_text(json.dumps({"from": start}))


def test_stage_retried_on_another_worker_resumes_from_the_store(tmp_path, monkeypatch):
    from t3d import runner
    from t3d.priors.compute import ComputeParams
    from t3d.stage import RecoveryParams

    registry = {"ck": Stage(name="ck", version="1", params=CkParams, inputs=(), run=_run_ck)}
    cfg = SimpleNamespace(
        enabled_stages=lambda: ["ck"],
        stages=SimpleNamespace(ck=CkParams()),
        seed=0,
        negative_prompt="",
        prior="tiny-pixel",
        camera=CameraParams(),
        device="cpu",
        recovery=RecoveryParams(),
        compute=ComputeParams(),
        backends=BackendsParams(),
    )
    uri = _memory_uri()
    CALLS.clear()
    worker_a = ArtifactStore(uri, cache_dir=tmp_path / "a")
    (step,) = runner.plan(cfg, "p", registry, worker_a)
    monkeypatch.setenv("T3D_TEST_CK_FAIL", "1")
    with pytest.raises(runner.StageFailed, match="worker lost"):
        runner.execute(cfg, "p", step, registry, worker_a, show_progress=False)
    monkeypatch.delenv("T3D_TEST_CK_FAIL")
    assert worker_a.fs.exists(f"{worker_a.root}/checkpoints/{step.key}/index.json")

    worker_b = ArtifactStore(uri, cache_dir=tmp_path / "b")
    (step_b,) = runner.plan(cfg, "p", registry, worker_b)
    result = runner.execute(cfg, "p", step_b, registry, worker_b, show_progress=False)
    assert result.state == "computed" and CALLS == [0, 3]
    assert json.loads((Path(result.path) / "done.json").read_text()) == {"from": 3}
    assert not worker_b.fs.exists(f"{worker_b.root}/checkpoints/{step.key}")
    assert not (worker_b.local_root / "checkpoints" / step.key).exists()


# ---- artifacts never pin a backend ----------------------------------------------------------------------
def test_field_saved_with_the_cuda_hash_grid_loads_on_the_torch_twin(tmp_path):
    from t3d.fields.hashgrid import choose_hashgrid
    from t3d.fields.nerf import FIELD_CONFIG, FieldParams, NeRFField, load_field, save_field

    grid = {
        "otype": "HashGrid",
        "n_levels": 2,
        "n_features_per_level": 2,
        "log2_hashmap_size": 8,
        "base_resolution": 4,
        "per_level_scale": 2.0,
    }
    torch_grid = choose_hashgrid("torch", "cpu")
    field = NeRFField(FieldParams(grid=grid), torch_grid, seed=3)
    with torch.no_grad():
        field.encoding.params.uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    # field.json names no backend: the architecture only
    save_field(field, tmp_path)
    assert "backend" not in json.loads((tmp_path / FIELD_CONFIG).read_text())
    loaded = load_field(tmp_path, choose_hashgrid("auto", "cpu"))
    assert loaded.backend.backend == "torch" and loaded.backend.reason == "device is cpu"
    assert loaded.state_dict().keys() == field.state_dict().keys()
    for name, value in field.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    pts = torch.rand(64, 3) * 1.6 - 0.8
    with torch.no_grad():
        torch.testing.assert_close(loaded(pts)[0], field(pts)[0])
        torch.testing.assert_close(loaded(pts)[1], field(pts)[1])
    # Artifacts written before flow.yaml's `backends:` hold a backend request; a CPU worker must
    # still load them, and the request is not re-applied.
    cfg = json.loads((tmp_path / FIELD_CONFIG).read_text())
    (tmp_path / FIELD_CONFIG).write_text(json.dumps({**cfg, "backend": "cuda-library"}))
    old = load_field(tmp_path, torch_grid)
    assert old.backend.reason == "requested" and old.params == field.params
    with torch.no_grad():
        torch.testing.assert_close(old(pts)[0], field(pts)[0])


# ---- priors: classes from an allow-list only --------------------------------------------------------------
def _prior_folder(tmp_path: Path, index) -> Path:
    folder = tmp_path / "prior"
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    data = index if isinstance(index, bytes) else json.dumps(index).encode()
    (folder / "model_index.json").write_bytes(data)
    return folder


def test_model_index_cannot_import_a_module_from_the_working_directory(tmp_path, monkeypatch):
    from t3d.priors import load_prior, prior_identity
    from t3d.priors.loading import InvalidPriorError, PriorNotFoundError

    marker = tmp_path / "imported.txt"
    (tmp_path / "t3d_evil_prior_mod.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nclass CLIPTokenizer: pass\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as under `python -m`: the current directory is importable
    folder = _prior_folder(
        tmp_path, {"_class_name": "StableDiffusionPipeline", "tokenizer": ["t3d_evil_prior_mod", "CLIPTokenizer"]}
    )
    with pytest.raises(InvalidPriorError) as e:
        load_prior(str(folder))
    msg = str(e.value)
    assert isinstance(e.value, PriorNotFoundError) and "\n" not in msg
    assert msg.startswith(f'{folder / "model_index.json"}: "tokenizer" names t3d_evil_prior_mod.CLIPTokenizer')
    assert "transformers.CLIPTokenizer" in msg and "fix the entry" in msg
    with pytest.raises(InvalidPriorError, match="tokenizer"):
        prior_identity(str(folder))
    assert not marker.exists() and "t3d_evil_prior_mod" not in sys.modules


@pytest.mark.parametrize(
    "name, entry",
    [
        ("text_encoder", ["os", "system"]),
        ("text_encoder", ["transformers", "AutoModel"]),
        ("unet", ["diffusers", "UNet2DModel"]),
        ("scheduler", ["builtins", "eval"]),
        ("vae", "AutoencoderKL"),
    ],
)
def test_model_index_classes_outside_the_allow_list_are_refused(tmp_path, name, entry):
    from t3d.priors import load_prior
    from t3d.priors.loading import InvalidPriorError

    folder = _prior_folder(tmp_path, {"_class_name": "StableDiffusionPipeline", name: entry})
    with pytest.raises(InvalidPriorError, match=rf'model_index.json: "{name}" '):
        load_prior(str(folder))


def test_allow_listed_classes_resolve_without_importing_named_modules():
    import transformers

    from t3d.priors.loading import _class_from_index

    assert (
        _class_from_index(
            {"tokenizer": ["transformers", "T5TokenizerFast"]}, "tokenizer", "transformers", "CLIPTokenizer"
        )
        is transformers.T5TokenizerFast
    )
    assert (
        _class_from_index({"tokenizer": [None, None]}, "tokenizer", "transformers", "CLIPTokenizer")
        is transformers.CLIPTokenizer
    )
    assert _class_from_index({}, "text_encoder", "transformers", "T5EncoderModel") is transformers.T5EncoderModel


@pytest.mark.parametrize(
    "data, why",
    [(b"\xff\xfe\x00garbage", "not UTF-8"), (b"{not json", "not valid JSON"), (b"[1, 2]", "expected a JSON object")],
)
def test_garbage_model_index_names_the_file(tmp_path, data, why):
    from t3d.priors import load_prior, prior_identity
    from t3d.priors.loading import InvalidPriorError

    folder = _prior_folder(tmp_path, data)
    for call in (load_prior, prior_identity):
        with pytest.raises(InvalidPriorError) as e:
            call(str(folder))
        assert str(e.value).startswith(f"{folder / 'model_index.json'}: {why}") and "\n" not in str(e.value)


# ---- every import is declared ----------------------------------------------------------------------------
OPTIONAL = {"tinycudann", "nvdiffrast"}  # the `cuda` extra; imported inside try / smoke ops


def _imported_top_level_modules() -> set[str]:
    names: set[str] = set()
    for folder in ("t3d", "stages", "priors", "flows", "cli"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module.split(".")[0])
    return names


def _declared_dependencies() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    names = re.findall(r'^\s*"([A-Za-z0-9_.\-]+)', block, re.M)
    return {re.sub(r"[-_.]+", "-", n).lower() for n in names}


def _distributions_of(module: str) -> list[str]:
    """Installed distributions providing a top-level module (also single-file extension modules,
    which packages_distributions() misses before Python 3.12, e.g. xatlas)."""
    found = importlib.metadata.packages_distributions().get(module)
    if found:
        return found
    spec = importlib.util.find_spec(module)
    origin = Path(spec.origin).resolve() if spec and spec.origin else None
    return [
        dist.metadata["Name"]
        for dist in importlib.metadata.distributions()
        if origin
        and any(Path(dist.locate_file(f)).resolve() == origin for f in dist.files or [] if str(f).startswith(module))
    ]


def test_every_third_party_import_is_a_declared_dependency():
    declared = _declared_dependencies()
    assert {"torch", "scipy", "fsspec"} <= declared
    undeclared = {}
    for module in sorted(
        _imported_top_level_modules() - set(sys.stdlib_module_names) - OPTIONAL - {"t3d", "__future__"}
    ):
        provided_by = {re.sub(r"[-_.]+", "-", d).lower() for d in _distributions_of(module)}
        assert provided_by, f"{module} is imported but no installed distribution provides it"
        if not provided_by & declared:
            undeclared[module] = sorted(provided_by)
    assert undeclared == {}, f"imported but not in pyproject.toml dependencies: {undeclared}"
