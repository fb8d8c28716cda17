"""Self-healing stages: a NaN or a collapsed field rolls back to the last good checkpoint and retries
with a new noise stream and lower learning rates; the retries are in the manifest; a corrupt
checkpoint restarts the stage."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from t3d.fields.hashgrid import choose_hashgrid
from t3d.flows.config import load_config
from t3d.flows.flow import run_prompt
from t3d.stage import RecoveryParams, divergence
from t3d.stages import default_registry
from t3d.stages.coarse import CoarseTrainer, load_field

FLOW = textwrap.dedent("""
    prompt: a red cube
    prior: tiny-pixel
    store: ./store
    stages:
      coarse: {steps: 8, checkpoint_every: 3, preview_frames: 4, preview_size: 16, n_samples: 8, resolution: 16,
               eval_views: 2}
      extract_mesh: {enabled: false}
      texture: {enabled: false}
      export: {enabled: false}
    """)


def _run(tmp_path, extra: str = ""):
    tmp_path.mkdir(parents=True, exist_ok=True)
    flow = tmp_path / "flow.yaml"
    flow.write_text(FLOW + extra)
    reg = default_registry()
    cfg = load_config(flow, registry=reg)
    return run_prompt(
        cfg, cfg.prompt, reg, flow_file=str(flow), use_prefect=False, show_progress=False
    ), tmp_path / "store"


def _manifest(store, key):
    return json.loads((store / "objects" / key / "manifest.json").read_text())


def test_divergence_rules():
    p = RecoveryParams(collapse_opacity=0.01, collapse_steps=3)
    assert divergence([{"loss": 1.0, "opacity": 0.3}], p) is None
    assert "loss is nan" in divergence([{"loss": float("nan"), "opacity": 0.3}], p)
    assert divergence([{"loss": 1.0, "opacity": 0.001}] * 2, p) is None  # too short to call
    assert "collapsed" in divergence([{"loss": 1.0, "opacity": 0.3}] + [{"loss": 1.0, "opacity": 0.001}] * 3, p)


def test_nan_rolls_back_to_the_checkpoint_and_retries(tmp_path, monkeypatch):
    real_step = CoarseTrainer.step
    fired = []

    def poisoned(self):
        rec = real_step(self)
        if rec["step"] == 5 and not fired:  # after the step-3 checkpoint: the field really goes NaN
            fired.append(True)
            with torch.no_grad():
                next(self.field.mlp.parameters()).fill_(float("nan"))
            rec["loss"] = float("nan")
            self.history[-1]["loss"] = float("nan")
        return rec

    monkeypatch.setattr(CoarseTrainer, "step", poisoned)
    result, store = _run(tmp_path)
    assert result.state == "completed", result.error
    coarse = next(r for r in result.results if r.stage == "coarse")
    recoveries = _manifest(store, coarse.key)["metrics"]["recoveries"]
    assert recoveries == [{"step": 5, "reason": "loss is nan", "rolled_back_to": 3, "lr_scale": 0.5}]
    field = load_field(store / "objects" / coarse.key, choose_hashgrid("auto", "cpu"))
    assert all(torch.isfinite(p).all() for p in field.parameters())
    losses = json.loads((store / "objects" / coarse.key / "losses.json").read_text())
    assert [r["step"] for r in losses] == list(range(8)) and all(math.isfinite(r["loss"]) for r in losses)


def test_collapse_retries_then_fails_with_one_line_when_it_persists(tmp_path, monkeypatch):
    real_step = CoarseTrainer.step

    def empty(self):
        rec = real_step(self)
        rec["opacity"] = self.history[-1]["opacity"] = 0.0
        return rec

    monkeypatch.setattr(CoarseTrainer, "step", empty)
    result, store = _run(tmp_path, "recovery: {retries: 2, collapse_steps: 2}\n")
    assert result.state == "failed"
    assert "collapsed" in result.error and "also after 2 retries" in result.error
    assert not list((store / "objects").glob("coarse-*")), "a failed stage leaves no artifact"


def test_collapse_once_heals_and_the_key_ignores_recovery_settings(tmp_path, monkeypatch):
    plain, _ = _run(tmp_path / "plain")
    real_step = CoarseTrainer.step
    state = {"left": 2}

    def collapse_twice(self):
        rec = real_step(self)
        if rec["step"] >= 1 and state["left"] > 0:
            state["left"] -= 1
            rec["opacity"] = self.history[-1]["opacity"] = 0.0
        return rec

    monkeypatch.setattr(CoarseTrainer, "step", collapse_twice)
    healed, store = _run(tmp_path / "healed", "recovery: {collapse_steps: 2, lr_factor: 0.25}\n")
    assert healed.state == "completed", healed.error
    coarse = next(r for r in healed.results if r.stage == "coarse")
    assert coarse.key == next(r for r in plain.results if r.stage == "coarse").key
    (rec,) = _manifest(store, coarse.key)["metrics"]["recoveries"]
    assert rec["rolled_back_to"] == 0 and rec["lr_scale"] == 0.25 and "collapsed" in rec["reason"]


def test_truncated_checkpoint_restarts_the_stage(tmp_path, monkeypatch):
    real_step = CoarseTrainer.step

    def crash_at_7(self):
        if self.step_idx == 7:
            raise RuntimeError("killed")
        return real_step(self)

    monkeypatch.setattr(CoarseTrainer, "step", crash_at_7)
    first, store = _run(tmp_path)
    assert first.state == "failed"
    (ckpt,) = (store / "checkpoints").glob("coarse-*/state.safetensors")
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated
    monkeypatch.setattr(CoarseTrainer, "step", real_step)
    again, _ = _run(tmp_path)
    assert again.state == "completed", again.error
    coarse = next(r for r in again.results if r.stage == "coarse")
    assert "resumed_from" not in _manifest(store, coarse.key)["metrics"], "restarted from step 0"


@pytest.mark.parametrize("bad", ["retries: -1", "lr_factor: 0", "colapse_steps: 3"])
def test_recovery_block_is_validated(tmp_path, bad):
    from t3d.flows.config import ConfigError

    (tmp_path / "flow.yaml").write_text(FLOW + f"recovery: {{{bad}}}\n")
    with pytest.raises(ConfigError, match="recovery"):
        load_config(tmp_path / "flow.yaml", registry=default_registry())
