"""Content-addressed artifact store: a stage's output folder is written once, verified on every reuse.

Layout under the store root (a local folder or any fsspec URI):
    objects/<key>/...files...       finished artifacts; manifest.json is written last
    runs/<run_id>.json              which keys a run (flow file x prompt) uses: for `ls` and `gc`
    locks/<key>.lock                a live claim: one writer per key across processes and machines
    checkpoints/<key>/              mid-stage checkpoints (remote stores: blobs/<sha256> + index.json)
    .tmp/                           local in-progress outputs, renamed into objects/ when complete

A folder without a manifest, or whose files do not match the manifest's sha256, is never used:
it is reported and recomputed. Stages always work on local folders; for remote stores finished
artifacts are uploaded (manifest last) and downloaded into a local cache on reuse.

A manifest is trusted only if it is well formed (see `check_manifest`): every entry of `files` is
a relative POSIX path without `..`, `.`, empty segments, backslashes, colons or control
characters, that resolves inside the artifact folder; `files` is not empty (the writer refuses to
commit an artifact without files, so every stage writes at least one); and `file_count` /
`files_digest` (sha256 of the canonical JSON of `files`, written by the writer) agree with `files`
when present (manifests written before they existed have neither).

Files and folders the store writes follow the process umask (files 0o666 & ~umask, folders
0o777 & ~umask), also files that libraries create private (safetensors writes 0600).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


# What gc may delete: artifact keys as artifact_key() makes them, and the store's own temp folders
# (writer: <key>-<8 hex>, download: dl-<key>-<8 hex>, replaced artifact: trash-<key>-<8 hex>,
# checkpoint download: ckpt-<key>-<8 hex>). Anything else under the store is left alone.
KEY_RE = re.compile(r"^[a-z_]+-[0-9a-f]{20}$")
TMP_RE = re.compile(r"^(?:(?:dl|trash|ckpt)-)?(?P<key>[a-z_]+-[0-9a-f]{20})-[0-9a-f]{8}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CHECKPOINT_INDEX = "index.json"


class StoreError(ValueError):
    """The store cannot do what was asked as it stands (e.g. a damaged run record blocks gc)."""


class ArtifactCorrupt(Exception):
    """An artifact folder exists but cannot be trusted (missing manifest, missing file, bad hash)."""


# ---- manifest checks ---------------------------------------------------------------------------
def check_manifest_path(key: str, rel: Any) -> str:
    """`rel` if it is a safe relative path for a file of artifact `key`, else ArtifactCorrupt.

    Purely syntactic (the same rule for every store type): a non-empty str, POSIX separators, no
    absolute path, drive letter, backslash, colon, control character, or empty / '.' / '..'
    segment, and not the manifest itself. `resolve_inside` adds the check against a real folder.
    """

    def bad(why: str) -> ArtifactCorrupt:
        return ArtifactCorrupt(f"{key}: manifest entry {rel!r} {why}")

    if not isinstance(rel, str) or not rel:
        raise bad("is not a non-empty string")
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        raise bad("contains a control character")
    if "\\" in rel:
        raise bad("contains a backslash")
    if rel.startswith("/"):
        raise bad("is an absolute path")
    if ":" in rel:
        raise bad("contains ':' (drive letter or URL)")
    if any(part in ("", ".", "..") for part in rel.split("/")):
        raise bad("has an empty, '.' or '..' segment")
    if rel == MANIFEST:
        raise bad("names the manifest itself")
    return rel


def resolve_inside(key: str, base: Path, rel: str) -> Path:
    """base/rel, resolved (symlinks followed); ArtifactCorrupt if that is not inside base."""
    check_manifest_path(key, rel)
    root = Path(os.path.realpath(base))
    target = Path(os.path.realpath(root / rel))
    if target == root or root not in target.parents:
        raise ArtifactCorrupt(f"{key}: manifest entry {rel!r} resolves outside the artifact folder")
    return target


def files_digest(files: dict[str, str]) -> str:
    """sha256 of the file list itself (names and digests), recorded by the writer."""
    return hashlib.sha256(canonical_json(files).encode()).hexdigest()


def check_manifest(key: str, manifest: Any) -> dict[str, str]:
    """The manifest's `files`, once the manifest is well formed (see the module doc); else ArtifactCorrupt."""
    if not isinstance(manifest, dict):
        raise ArtifactCorrupt(f"{key}: manifest.json is not a JSON object")
    if manifest.get("key") != key:
        raise ArtifactCorrupt(f"{key}: manifest names key {manifest.get('key')!r}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactCorrupt(f"{key}: manifest has no 'files' mapping")
    if not files:
        raise ArtifactCorrupt(f"{key}: manifest lists no files (every artifact has at least one)")
    for rel, digest in files.items():
        check_manifest_path(key, rel)
        if not isinstance(digest, str) or not _SHA256_RE.match(digest):
            raise ArtifactCorrupt(f"{key}: manifest entry {rel!r} has no valid sha256 ({str(digest)[:20]!r})")
    if "file_count" in manifest and manifest["file_count"] != len(files):
        raise ArtifactCorrupt(
            f"{key}: manifest lists {len(files)} files but file_count says {manifest['file_count']!r}"
        )
    if "files_digest" in manifest and manifest["files_digest"] != files_digest(files):
        raise ArtifactCorrupt(f"{key}: manifest's file list does not match its files_digest (edited manifest?)")
    return files


# ---- permissions ---------------------------------------------------------------------------------
_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where possible (/proc/self/status on Linux).

    Elsewhere it falls back to os.umask(x); os.umask(old) under a lock: safe against other callers
    of this function, but a thread creating files through another path in that instant would use
    the temporary value (0o022, the usual default, to keep that harmless).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        old = os.umask(0o022)
        os.umask(old)
    return old


def apply_umask(path: Path | str) -> None:
    """chmod a file, or a folder and everything under it, to what a plain create would give:
    files 0o666 & ~umask (0o777 if they were executable), folders 0o777 & ~umask. Links are skipped."""
    umask = current_umask()
    file_mode, exec_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask, 0o777 & ~umask
    path = Path(path)

    def fix(p: Path) -> None:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            return
        if stat.S_ISDIR(st.st_mode):
            wanted = dir_mode
        else:
            wanted = exec_mode if st.st_mode & 0o111 else file_mode
        if stat.S_IMODE(st.st_mode) != wanted:
            os.chmod(p, wanted)

    fix(path)
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                fix(Path(dirpath) / name)


def sha256_file(path: Path | str, fs: fsspec.AbstractFileSystem | None = None) -> str:
    h = hashlib.sha256()
    opener = fs.open if fs is not None else open
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def artifact_key(
    stage: str,
    version: str,
    params: dict,
    seed: int | None,
    inputs: dict[str, str],
    prior: str,
    context: dict | None = None,
) -> str:
    """Same (stage, version, params, seed, upstream keys, prior, context) -> same key -> same artifact."""
    payload = {
        "stage": stage,
        "version": version,
        "params": params,
        "seed": seed,
        "inputs": dict(sorted(inputs.items())),
        "prior": prior,
        "context": context or {},
    }
    digest = hashlib.sha256(canonical_json(payload).encode()).hexdigest()
    return f"{stage}-{digest[:20]}"


def short_id(key: str) -> str:
    """The id people read and type: the key's hash part, 8 hex (`t3d show` takes it)."""
    return key.rsplit("-", 1)[-1][:8]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _checkpoint_step(folder: Path) -> int | None:
    """The step a local checkpoint folder holds (t3d.stage's state.json), or None if unreadable."""
    try:
        step = json.loads((folder / "state.json").read_text()).get("step")
        return int(step) if step is not None else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _newest_mtime(path: Path) -> float:
    """The newest mtime of a path and everything under it (a running writer touches the deep files)."""
    newest = os.lstat(path).st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def _remove_local(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _info_mtime(info: dict) -> float | None:
    """Modification time from an fsspec info dict, across backends (local, memory, s3, gcs, ...)."""
    for name in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(name)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            continue
        with contextlib.suppress(TypeError, ValueError):
            return float(value)
    return None


@dataclass
class Artifact:
    key: str
    path: Path  # local folder holding the verified files
    manifest: dict


class InputCorrupt(ArtifactCorrupt):
    """An upstream artifact that a computation needs cannot be trusted (`name` is its stage)."""

    def __init__(self, name: str, key: str, cause: ArtifactCorrupt):
        super().__init__(str(cause))
        self.name, self.key = name, key


@dataclass
class Workspace:
    """What `ArtifactStore.compute` hands the computation: where to write, resume and read."""

    out: Path  # empty local folder; committed atomically when the computation returns
    checkpoints: Path  # local; kept when the computation fails, dropped once the key is committed
    inputs: dict[str, Path]  # upstream name -> local folder of its verified artifact
    sync_checkpoint: Callable[[], None]  # make `checkpoints` durable in the store (remote stores)


@dataclass
class Computed:
    artifact: Artifact
    meanwhile: bool  # True: another run committed the key while this one waited for its claim


class ArtifactStore:
    # Object stores without exclusive create ("xb"): a claim is written, read back after this many
    # seconds, and won by whoever's write is visible then. It must exceed the store's write latency.
    CLAIM_SETTLE_S = 2.0

    def __init__(self, uri: str | os.PathLike = "./artifacts", cache_dir: str | os.PathLike | None = None):
        self.uri = str(uri)
        self.fs, root = fsspec.core.url_to_fs(self.uri)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/") if root not in ("/", "") else root
        if self.is_local:
            self.root = str(Path(self.root).resolve())
            Path(self.root).mkdir(parents=True, exist_ok=True)
            self.local_root = Path(self.root)
        else:
            base = Path(cache_dir or os.environ.get("T3D_CACHE", Path.home() / ".cache" / "t3d"))
            slug = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
            self.local_root = base / f"store-{slug}"
            self.local_root.mkdir(parents=True, exist_ok=True)
        self._verified: dict[str, float] = {}
        self._exclusive: bool | None = None  # does this fs honour open(path, "xb")? probed once

    # ---- paths ----------------------------------------------------------------------------
    def _obj(self, key: str, *parts: str) -> str:
        return "/".join([self.root, "objects", key, *parts])

    def _ckpt(self, key: str, *parts: str) -> str:
        return "/".join([self.root, "checkpoints", key, *parts])

    def local_path(self, key: str) -> Path:
        return self.local_root / "objects" / key

    # ---- mid-stage checkpoints --------------------------------------------------------------
    def checkpoint_dir(self, key: str) -> Path:
        """Where a running stage keeps mid-stage checkpoints (kept on failure, dropped on success).

        Always a local folder. For a remote store, a checkpoint that a stage synced into the store
        (sync_checkpoint) is downloaded first when it is newer than the local one, so a stage retried
        on another machine resumes where the last one stopped.
        """
        path = self.local_root / "checkpoints" / key
        path.mkdir(parents=True, exist_ok=True)
        if not self.is_local:
            try:
                self._pull_checkpoint(key, path)
            except (OSError, ValueError, ArtifactCorrupt) as exc:
                log.warning("%s: the checkpoint in the store is unusable, keeping the local one: %s", key, exc)
        return path

    def sync_checkpoint(self, key: str) -> None:
        """Make the local checkpoint of `key` durable in the store (call after each checkpoint write).

        Local store: the folder is already in the store; only file modes are normalised. Remote
        store: every file goes up as checkpoints/<key>/blobs/<sha256>, then index.json naming them
        (the commit point), then blobs the new index does not name are removed, so a reader sees
        the previous checkpoint or this one, never a mix.
        """
        local = self.local_root / "checkpoints" / key
        if not local.is_dir():
            return
        apply_umask(local)
        if self.is_local:
            return
        files = {
            p.relative_to(local).as_posix(): sha256_file(p)
            for p in sorted(local.rglob("*"))
            if p.is_file() and not p.is_symlink() and not p.name.endswith(".tmp")
        }
        if not files:
            return
        self.fs.makedirs(self._ckpt(key, "blobs"), exist_ok=True)
        for rel, digest in files.items():
            self.fs.put_file(str(local / rel), self._ckpt(key, "blobs", digest))
        index = {"key": key, "files": files, "step": _checkpoint_step(local), "written": _now()}
        self.fs.pipe_file(self._ckpt(key, CHECKPOINT_INDEX), json.dumps(index, sort_keys=True).encode())
        keep = set(files.values())
        for p in self.fs.ls(self._ckpt(key, "blobs"), detail=False):
            if p.rstrip("/").rsplit("/", 1)[-1] not in keep:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(p)

    def _pull_checkpoint(self, key: str, local: Path) -> bool:
        """Replace the local checkpoint folder by the store's if that one is newer; True if it did."""
        try:
            raw = self.fs.cat_file(self._ckpt(key, CHECKPOINT_INDEX))
        except FileNotFoundError:
            return False
        index = json.loads(raw)
        if (
            not isinstance(index, dict)
            or index.get("key") != key
            or not isinstance(index.get("files"), dict)
            or not index["files"]
        ):
            raise ArtifactCorrupt(f"{key}: checkpoint index.json is malformed")
        files: dict = index["files"]
        for rel, digest in files.items():
            check_manifest_path(key, rel)
            if not isinstance(digest, str) or not _SHA256_RE.match(digest):
                raise ArtifactCorrupt(f"{key}: checkpoint entry {rel!r} has no valid sha256")
        remote_step, local_step = index.get("step"), _checkpoint_step(local)
        if local_step is not None and (remote_step is None or local_step >= int(remote_step)):
            return False
        tmp = self.local_root / ".tmp" / f"ckpt-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            for rel, digest in files.items():
                dest = resolve_inside(key, tmp, rel)
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(self._ckpt(key, "blobs", digest), str(dest))
                if sha256_file(dest) != digest:
                    raise ArtifactCorrupt(f"{key}: checkpoint file {rel} does not match its sha256")
            shutil.rmtree(local, ignore_errors=True)
            os.replace(tmp, local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("%s: resuming from the store's checkpoint at step %s", key, remote_step)
        return True

    def _drop_remote_checkpoint(self, key: str) -> None:
        if not self.is_local and self.fs.exists(self._ckpt(key)):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._ckpt(key), recursive=True)

    def drop_checkpoint(self, key: str) -> None:
        """Forget key's checkpoints, locally and in the store."""
        shutil.rmtree(self.local_root / "checkpoints" / key, ignore_errors=True)
        self._drop_remote_checkpoint(key)

    # ---- reading --------------------------------------------------------------------------
    def has_manifest(self, key: str) -> bool:
        return self.fs.exists(self._obj(key, MANIFEST))

    def read_manifest(self, key: str) -> dict:
        try:
            with self.fs.open(self._obj(key, MANIFEST), "rb") as f:
                return json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise ArtifactCorrupt(f"{key}: no manifest.json (incomplete write)") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactCorrupt(f"{key}: manifest.json is not valid JSON ({exc})") from None

    def verify(self, key: str) -> dict:
        """Check the manifest (check_manifest) and every file's sha256; raises ArtifactCorrupt. Returns the manifest."""
        manifest = self.read_manifest(key)
        files = check_manifest(key, manifest)
        for rel, digest in files.items():
            if self.is_local:
                path = str(resolve_inside(key, Path(self._obj(key)), rel))
            else:
                path = self._obj(key, rel)
            if not self.fs.exists(path):
                raise ArtifactCorrupt(f"{key}: file {rel} is missing")
            actual = sha256_file(path, self.fs)
            if actual != digest:
                raise ArtifactCorrupt(f"{key}: file {rel} has sha256 {actual[:12]}..., manifest says {digest[:12]}...")
        return manifest

    def status(self, key: str) -> str:
        """'complete', 'missing' or 'corrupt: <why>' (hashes checked)."""
        if not self.fs.exists(self._obj(key)):
            return "missing"
        try:
            self.verify(key)
            return "complete"
        except ArtifactCorrupt as exc:
            return f"corrupt: {exc}"

    def _cached_copy_ok(self, key: str, local: Path, files: dict[str, str]) -> bool:
        if not (local / MANIFEST).is_file():
            return False
        for rel, digest in files.items():
            path = resolve_inside(key, local, rel)
            if not path.is_file() or sha256_file(path) != digest:
                return False
        return True

    def get(self, key: str) -> Artifact:
        """A verified artifact as a local folder (downloaded into the cache for remote stores)."""
        manifest = self.verify(key)
        if self.is_local:
            return Artifact(key, self.local_path(key), manifest)
        files = check_manifest(key, manifest)
        local = self.local_path(key)
        if not self._cached_copy_ok(key, local, files):
            tmp = self.local_root / ".tmp" / f"dl-{key}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            try:
                for rel, digest in files.items():
                    dest = resolve_inside(key, tmp, rel)  # never outside the download folder
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    self.fs.get_file(self._obj(key, rel), str(dest))
                    if sha256_file(dest) != digest:  # changed between verify and download
                        raise ArtifactCorrupt(f"{key}: file {rel} changed while it was downloaded")
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
                apply_umask(tmp)
                shutil.rmtree(local, ignore_errors=True)
                local.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, local)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return Artifact(key, local, manifest)

    def keys(self) -> list[str]:
        base = f"{self.root}/objects"
        if not self.fs.exists(base):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))

    # ---- writing --------------------------------------------------------------------------
    def compute(
        self,
        key: str,
        manifest: dict,
        fn: Callable[[Workspace], dict | None],
        inputs: dict[str, str] | None = None,
        force: bool = False,
    ) -> Computed:
        """Compute `key` once across runs: claim it, run `fn`, commit, verify, release, clean up.

        Under the claim: when another run committed the key meanwhile, that artifact is returned
        (meanwhile=True) unless `force`. Otherwise `fn` gets a Workspace (upstream `inputs` keys
        verified and local; ArtifactCorrupt there is raised as InputCorrupt) and may return fields
        to add to the manifest (metrics, timings). Its output is committed atomically (see writer)
        and the key's checkpoints are dropped. A forced recompute of a committed key starts from
        no checkpoint: a checkpoint left beside a finished artifact cannot be told from a stale one.
        If `fn` raises, nothing is committed and the checkpoints stay for the next attempt.
        """
        manifest = dict(manifest)
        with self.claim(key) as missing:
            if not missing and not force:
                return Computed(self.get(key), meanwhile=True)
            if not missing:
                self.drop_checkpoint(key)
            local_inputs = {}
            for name, upstream in (inputs or {}).items():
                try:
                    local_inputs[name] = self.get(upstream).path
                except ArtifactCorrupt as exc:
                    raise InputCorrupt(name, upstream, exc) from exc
            work = Workspace(
                out=Path(),
                checkpoints=self.checkpoint_dir(key),
                inputs=local_inputs,
                sync_checkpoint=lambda: self.sync_checkpoint(key),
            )
            with self.writer(key, manifest) as out:
                work.out = out
                manifest.update(fn(work) or {})
            self.drop_checkpoint(key)
            return Computed(self.get(key), meanwhile=False)

    @contextlib.contextmanager
    def writer(self, key: str, manifest: dict) -> Iterator[Path]:
        """Yield an empty local folder; on clean exit hash its files, write the manifest, commit.

        On an exception nothing is committed and the temp folder is removed: a failed or killed
        stage never leaves a reusable artifact (a kill leaves only an orphan in .tmp/, which
        has no manifest in objects/ and is swept by `gc`). A folder with no file is an error:
        every artifact holds at least one file, so a manifest listing none is never trusted.
        File modes follow the umask; the key's checkpoints in a remote store are dropped on commit.
        """
        tmp_root = self.local_root / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = tmp_root / f"{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            files = {}
            for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
                rel = path.relative_to(tmp).as_posix()
                if rel == MANIFEST:
                    raise ValueError("stages must not write manifest.json themselves")
                check_manifest_path(key, rel)
                files[rel] = sha256_file(path)
            if not files:
                raise ValueError(f"{key}: the stage wrote no files; an artifact needs at least one")
            full = {
                **manifest,
                "key": key,
                "files": files,
                "file_count": len(files),
                "files_digest": files_digest(files),
                "committed": _now(),
            }
            (tmp / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
            apply_umask(tmp)
            self._commit(key, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._verified.pop(key, None)
        self._drop_remote_checkpoint(key)

    def _commit(self, key: str, tmp: Path) -> None:
        if self.is_local:
            final = self.local_path(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # a corrupt or forced-over artifact: move it aside first
                trash = self.local_root / ".tmp" / f"trash-{key}-{uuid.uuid4().hex[:8]}"
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)  # atomic on one filesystem
            return
        # Remote: clear any partial upload, upload files, manifest last (its presence = complete).
        remote = self._obj(key)
        if self.fs.exists(remote):
            self.fs.rm(remote, recursive=True)
        for path in sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST):
            rel = path.relative_to(tmp).as_posix()
            self.fs.makedirs(self._obj(key, *rel.split("/")[:-1]) if "/" in rel else remote, exist_ok=True)
            self.fs.put_file(str(path), self._obj(key, rel))
        self.fs.put_file(str(tmp / MANIFEST), self._obj(key, MANIFEST))

    def remove(self, key: str) -> None:
        path = self._obj(key)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        if not self.is_local:
            shutil.rmtree(self.local_path(key), ignore_errors=True)

    # ---- claims: one writer per key across processes and machines ----------------------------
    def _lock(self, key: str) -> str:
        return f"{self.root}/locks/{key}.lock"

    def _supports_exclusive_create(self) -> bool:
        """Whether open(path, "xb") on this filesystem really refuses an existing file (probed once:
        fsspec's generic buffered file accepts "xb" and may overwrite anyway)."""
        if self._exclusive is None:
            probe = f"{self.root}/locks/.xb-probe-{uuid.uuid4().hex}"
            try:
                self.fs.makedirs(f"{self.root}/locks", exist_ok=True)
                with self.fs.open(probe, "xb") as f:
                    f.write(b"1")
                try:
                    with self.fs.open(probe, "xb") as f:
                        f.write(b"2")
                    self._exclusive = False
                except FileExistsError:
                    self._exclusive = True
            except Exception as exc:  # NotImplementedError, ValueError: mode not supported
                log.debug("exclusive create probe on %s failed: %r", self.uri, exc)
                self._exclusive = False
            finally:
                with contextlib.suppress(Exception):
                    self.fs.rm(probe)
            if not self._exclusive:
                log.warning(
                    "%s has no exclusive create: claims fall back to write, wait %.1fs, read back (safe only "
                    "while writes land within that time)",
                    self.uri,
                    self.CLAIM_SETTLE_S,
                )
        return self._exclusive

    def _try_lock(self, key: str, owner: dict) -> bool:
        path = self._lock(key)
        body = json.dumps(owner).encode()
        if self.is_local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            return True
        self.fs.makedirs(f"{self.root}/locks", exist_ok=True)
        if self._supports_exclusive_create():
            try:
                with self.fs.open(path, "xb") as f:  # e.g. S3 If-None-Match, GCS ifGenerationMatch=0
                    f.write(body)
            except FileExistsError:
                return False
            return True
        # No exclusive create: write, let every concurrent write land, read back; the last writer wins.
        if self.fs.exists(path):
            return False
        with self.fs.open(path, "wb") as f:
            f.write(body)
        time.sleep(self.CLAIM_SETTLE_S)
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read() or b"{}").get("token") == owner["token"]
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    def _refresh_lock(self, key: str, owner: dict) -> None:
        """Heartbeat: bump the lock's mtime (object stores: rewrite it, if it is still ours)."""
        path = self._lock(key)
        if self.is_local:
            os.utime(path)
            return
        with self.fs.open(path, "rb") as f:
            if json.loads(f.read() or b"{}").get("token") != owner["token"]:
                return  # broken and re-claimed by someone else: leave theirs alone
        self.fs.pipe_file(path, json.dumps(owner).encode())

    def _lock_is_stale(self, key: str, stale_s: float) -> bool:
        path = self._lock(key)
        try:
            with self.fs.open(path, "rb") as f:
                owner = json.loads(f.read() or b"{}")
            info = self.fs.info(path)
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return True
        if not isinstance(owner, dict):
            return True
        if owner.get("host") == socket.gethostname() and owner.get("pid"):
            try:
                os.kill(int(owner["pid"]), 0)
            except ProcessLookupError:
                return True  # the holder died on this machine
            except (PermissionError, ValueError, OverflowError):
                pass
        mtime = _info_mtime(info)
        if mtime is None:
            return False
        return time.time() - mtime > stale_s

    def claim_is_live(self, key: str, stale_s: float = 120.0) -> bool:
        """True while some process holds key's claim (its lock exists and is not stale)."""
        return self.fs.exists(self._lock(key)) and not self._lock_is_stale(key, stale_s)

    @contextlib.contextmanager
    def claim(
        self, key: str, poll_s: float = 0.5, stale_s: float = 120.0, timeout_s: float | None = None
    ) -> Iterator[bool]:
        """Hold the right to compute `key`. Yields True to compute, False if another writer finished it.

        A second run needing the same missing artifact waits for the first instead of writing it
        twice. The holder refreshes its lock every stale_s/4; a lock whose holder died (or went
        silent for stale_s) is broken. Object stores take the lock with an exclusive create where
        the filesystem has one (see _try_lock).
        """
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex, "since": _now()}
        started = time.monotonic()
        while not self._try_lock(key, owner):
            if self.has_manifest(key) and self.status(key) == "complete":
                yield False
                return
            if self._lock_is_stale(key, stale_s):
                if self.fs.exists(self._lock(key)):  # gone meanwhile: just try again, never remove a new holder's lock
                    log.warning("%s: the run that was computing it stopped (stale claim); taking over", key)
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm(self._lock(key))
                continue
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise TimeoutError(
                    f"{key} is being computed by another run (lock {self._lock(key)}); waited {timeout_s:.0f}s"
                )
            time.sleep(poll_s)
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(stale_s / 4):
                with contextlib.suppress(Exception):
                    self._refresh_lock(key, owner)

        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        try:
            # Someone may have committed between our status check and the claim.
            yield self.status(key) != "complete"
        finally:
            stop.set()
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self._lock(key))

    # ---- runs and garbage collection ------------------------------------------------------
    def record_run(self, run_id: str, record: dict) -> None:
        self.fs.makedirs(f"{self.root}/runs", exist_ok=True)
        with self.fs.open(f"{self.root}/runs/{run_id}.json", "w") as f:
            f.write(json.dumps({**record, "run_id": run_id, "updated": _now()}, indent=2, sort_keys=True, default=str))

    def runs(self, strict: bool = False) -> list[dict]:
        """Every run record. An unreadable one is skipped with a warning, or, strict (gc, which
        must not delete what a damaged record references), raises StoreError naming it."""
        base = f"{self.root}/runs"
        if not self.fs.exists(base):
            return []
        out = []
        for p in sorted(self.fs.ls(base, detail=False)):
            if p.endswith(".json"):
                try:
                    with self.fs.open(p, "r") as f:
                        record = json.load(f)
                    if not isinstance(record, dict) or not isinstance(record.get("stages", {}), dict):
                        raise ValueError("not a run record")
                except (OSError, ValueError, UnicodeDecodeError) as exc:
                    message = (
                        f"run record {p} is unreadable ({type(exc).__name__}: {str(exc)[:80]}); "
                        "delete it or re-run its flow"
                    )
                    if strict:
                        raise StoreError(message) from None
                    log.warning("%s", message)
                    continue
                out.append(record)
        return out

    def gc(self, dry_run: bool = False, min_age_s: float = 3600.0, stale_s: float = 120.0) -> list[str]:
        """Delete what the store created and nothing needs; returns what went (dry_run: what would go).

        Only names the store itself makes are candidates (KEY_RE, TMP_RE): anything else under
        objects/, checkpoints/ or .tmp/ is never touched. A key whose claim is live (claim_is_live
        with stale_s) is skipped everywhere. The entries, relative to the store root (a remote
        store's local cache entries start with "cache:"):
          objects/<key>       artifacts no run record references (and their cached copy)
          checkpoints/<key>   checkpoints of keys no run references, or whose artifact is committed
          .tmp/<name>         the store's temp folders, untouched for min_age_s
        dry_run deletes nothing and returns exactly the list a real run would act on.
        """
        referenced = {key for run in self.runs(strict=True) for key in run.get("stages", {}).values()}
        live: dict[str, bool] = {}

        def is_live(key: str) -> bool:
            if key not in live:
                live[key] = self.claim_is_live(key, stale_s)
            return live[key]

        def checkpoint_is_garbage(key: str) -> bool:
            return bool(KEY_RE.match(key)) and (key not in referenced or self.has_manifest(key)) and not is_live(key)

        actions: list[tuple[str, Any]] = []
        for key in self.keys():
            if KEY_RE.match(key) and key not in referenced and not is_live(key):
                actions.append((f"objects/{key}", lambda k=key: self.remove(k)))
        cache = "" if self.is_local else "cache:"
        if not self.is_local and self.fs.exists(f"{self.root}/checkpoints"):
            for p in sorted(self.fs.ls(f"{self.root}/checkpoints", detail=False)):
                key = p.rstrip("/").rsplit("/", 1)[-1]
                if checkpoint_is_garbage(key):
                    actions.append((f"checkpoints/{key}", lambda k=key: self._drop_remote_checkpoint(k)))
        local_ckpt = self.local_root / "checkpoints"
        for path in sorted(local_ckpt.iterdir()) if local_ckpt.is_dir() else []:
            if path.is_dir() and not path.is_symlink() and checkpoint_is_garbage(path.name):
                actions.append((f"{cache}checkpoints/{path.name}", lambda p=path: _remove_local(p)))
        local_tmp = self.local_root / ".tmp"
        now = time.time()
        for path in sorted(local_tmp.iterdir()) if local_tmp.is_dir() else []:
            match = TMP_RE.match(path.name)
            if not match or now - _newest_mtime(path) < min_age_s or is_live(match.group("key")):
                continue
            actions.append((f"{cache}.tmp/{path.name}", lambda p=path: _remove_local(p)))
        if not dry_run:
            for _, act in actions:
                act()
        return [name for name, _ in actions]
