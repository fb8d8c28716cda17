"""Run the Khronos glTF validator (npm gltf-validator, installed by scripts/install.sh) on a GLB.

Skips where node or the package is missing on a developer's machine; under CI=true that is a
failure instead, since CI installs both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

VALIDATOR = Path(__file__).resolve().parents[1] / "scripts" / "gltf_validate.js"


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI installs it through scripts/install.sh)")
    pytest.skip(reason)


def assert_valid_glb(path: Path) -> dict:
    if shutil.which("node") is None:
        _missing("node is not installed: cannot run the Khronos glTF validator")
    proc = subprocess.run(["node", str(VALIDATOR), str(path)], capture_output=True, text=True, timeout=120)
    if proc.returncode == 2 and "not found" in proc.stderr:
        _missing("gltf-validator missing: npm install --prefix .tools gltf-validator@2.0.0-dev.3.10")
    report = json.loads(proc.stdout)
    assert report["issues"]["numErrors"] == 0, report["issues"]["messages"]
    assert proc.returncode == 0
    return report
