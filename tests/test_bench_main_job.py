"""bench/main_job.py's reading of a run's store: per-stage seconds and the machine yardstick."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("main_job_bench", REPO / "bench" / "main_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _manifest(store: Path, name: str, stage: str, timings: dict, metrics: dict) -> None:
    folder = store / "objects" / name
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"stage": stage, "timings": timings, "metrics": metrics}))


def test_main_job_wall_is_also_given_in_prior_forward_passes(tmp_path):
    """Machines differ ~3x; wall / (coarse prior seconds per step) compares them: 80 s of prior
    over 400 steps is 0.2 s a step, so a 250 s wall is 1250 prior steps."""
    bench = _bench()
    _manifest(tmp_path, "coarse-1", "coarse", {"total_s": 130.0, "prior_forward_s": 80.0}, {"iou": 0.83, "steps": 400})
    _manifest(tmp_path, "export-1", "export", {"total_s": 4.0}, {"iou": 0.88, "color_err": 0.05})
    stages = bench.stage_summary(tmp_path)
    assert list(stages) == ["coarse", "export"]
    assert stages["coarse"]["steps"] == 400 and stages["export"]["color_err"] == 0.05
    assert bench.machine_yardstick(stages, 250.0) == {"prior_step_s": 0.2, "wall_in_prior_steps": 1250}
    assert bench.machine_yardstick({"export": stages["export"]}, 250.0) == {}  # no coarse timings: nothing to say
