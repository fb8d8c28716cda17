"""A stage context built the way the runner builds one, for tests that drive a stage or a
trainer directly: CPU, torch twins, the default camera; any field can be overridden."""

from __future__ import annotations

from pathlib import Path

import torch

from t3d.backends import BackendsParams
from t3d.render.cameras import CameraParams
from t3d.runner import Backends
from t3d.stage import StageContext


def stage_context(folder: Path, stage: str = "test", **fields) -> StageContext:
    """Outputs in folder/out, checkpoints in folder/ckpt (both overridable)."""
    values = {
        "stage": stage,
        "key": "test",
        "params": None,
        "seed": 0,
        "prompt": "a red cube",
        "negative_prompt": "",
        "device": torch.device("cpu"),
        "inputs": {},
        "out": folder / "out",
        "checkpoint_dir": folder / "ckpt",
        "backends": Backends(BackendsParams(hashgrid="torch", raster="torch"), "cpu"),
        "camera": CameraParams(),
        "show_progress": False,
    }
    return StageContext(**{**values, **fields})
