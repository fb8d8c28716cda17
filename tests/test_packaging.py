"""The package installs from a built wheel under the single `t3d` namespace, with its package data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contents_and_import_from_wheel(tmp_path):
    # Build from the tracked files only (as a clean checkout would), never from a stale build/.
    src = tmp_path / "src"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, (f.decode() for f in files)):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    wheel = next((tmp_path / "dist").glob("t3d-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"t3d"}, f"only the t3d namespace may be installed, got {tops}"
    for required in (
        "t3d/flows/config.py",
        "t3d/stages/encode_prompt.py",
        "t3d/cli/main.py",
        "t3d/priors/base.py",
        "t3d/store.py",
    ):
        assert required in names
    embedded = [n for n in names if n.startswith("t3d/priors/embedded/")]
    shipped = [p for p in (ROOT / "priors" / "embedded").rglob("*") if p.is_file()]
    assert len(embedded) == len(shipped), "every file of the embedded prior ships in the wheel"

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import t3d, t3d.cli.main, t3d.flows.flow, t3d.stages; print(t3d.__file__); "
        "print(list(t3d.stages.default_registry()))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[0].startswith(str(target)), out
    assert "encode_prompt" in out
