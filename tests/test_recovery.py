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
from t3d.fields.nerf import FieldParams, load_field
from t3d.flows.config import load_config
from t3d.flows.flow import run_prompt
from t3d.render.cameras import CameraParams
from t3d.stage import RecoveryParams, StageContext, divergence, run_resumable, stream_seed
from t3d.stages import default_registry
from t3d.stages.coarse import CoarseTrainer
from tests.contexts import stage_context
from tests.grids import CPU_GRID, TINY_GRID

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


def loop_ctx(folder, stage: str = "coarse", seed: int = 0) -> StageContext:
    """A bare stage context for driving a trainer through run_resumable (checkpoints in folder/ckpt)."""
    folder.mkdir(parents=True, exist_ok=True)
    return stage_context(folder, stage, seed=seed)


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


# ---- run_resumable: a run killed mid-way and resumed ends where an uninterrupted one does ------


@pytest.fixture(scope="module")
def tiny():
    from t3d.priors import build_tiny_prior
    from t3d.stages.encode_prompt import PromptEmbeddings

    prior = build_tiny_prior("pixel", seed=0, image_size=16)
    e = prior.encode_text(["a red cube", "", "front", "side", "back", "overhead"]).float()
    views = {v: e[2 + i : 3 + i] for i, v in enumerate(("front", "side", "back", "overhead"))}
    return prior, PromptEmbeddings(e[0:1], e[1:2], views, {})


def _small_field(folder=None):
    from t3d.fields.nerf import FieldParams, NeRFField, save_field

    field = NeRFField(FieldParams(grid=TINY_GRID, hidden=16, bound=0.9, blob_radius=0.4), CPU_GRID)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        save_field(field, folder)
    return field


def _coarse(tmp_path, prior, emb):
    from t3d.stages.coarse import CoarseParams

    p = CoarseParams(steps=5, resolution=8, n_samples=8, batch_size=1, occupancy_res=8, occupancy_every=2)
    p = p.model_copy(update={"albedo_warmup": 0.2, "lr_end_factor": 0.3})
    p = p.model_copy(update={"field": p.field.model_copy(update={"grid": TINY_GRID, "hidden": 16})})
    return CoarseTrainer(p, prior, emb, _camera(), CPU_GRID, seed=3)


def _refine(tmp_path, prior, emb):
    from t3d.stages.refine import RefineParams, VSDTrainer

    p = RefineParams(steps=5, batch_size=1, resolution=8, n_samples=8, lora_rank=2, lr_end_factor=0.3)
    return VSDTrainer(p, prior, emb, tmp_path / "field", _camera(), CPU_GRID, seed=3)


def _geometry(tmp_path, prior, emb):
    import numpy as np

    from t3d.mesh.dmtet import GeometryParams, GeometryTrainer

    r = 16
    lo, spacing = np.full(3, -1.0), np.full(3, 2.0 / (r - 1))
    axis = np.linspace(-1, 1, r)
    dist = np.sqrt(sum(g**2 for g in np.meshgrid(axis, axis, axis, indexing="ij")))
    settings = GeometryParams(steps=5, resolution=r, render_size=16, batch_size=1, correction_resolution=4)
    colour = torch.tensor([0.86, 0.12, 0.1])
    return GeometryTrainer(
        40.0 * (dist < 0.6),
        lo,
        spacing,
        1.0,
        lambda pts: colour.expand(len(pts), 3),
        prior,
        emb,
        _camera(),
        settings,
        torch.Generator().manual_seed(3),
        raster=_raster(),
    )


def _texture(guidance):
    def build(tmp_path, prior, emb):
        import trimesh

        from t3d.stages.texture import TextureParams, TextureTrainer

        sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
        verts = torch.as_tensor(sphere.vertices, dtype=torch.float32)
        faces = torch.as_tensor(sphere.faces, dtype=torch.long)
        p = TextureParams(steps=5, guidance=guidance, batch_size=1, resolution=16, lora_rank=2)
        field = _small_field(tmp_path / "field").requires_grad_(True)
        return TextureTrainer(p, prior, emb, field, verts, faces, _raster(), _camera(), "cpu", seed=3)

    return build


def _camera():

    return CameraParams()


def _raster():
    from t3d.render.raster import choose_raster

    return choose_raster("torch", "cpu")


@pytest.mark.parametrize(
    "build",
    [_coarse, _refine, _geometry, _texture("sds"), _texture("vsd")],
    ids=["coarse", "refine", "geometry", "texture-sds", "texture-vsd"],
)
def test_run_resumable_resumed_mid_way_equals_an_uninterrupted_run(tmp_path, tiny, build):
    prior, emb = tiny
    _small_field(tmp_path / "field")  # refine starts from a saved field
    straight = build(tmp_path, prior, emb)
    run_resumable(loop_ctx(tmp_path / "straight"), straight, 5, every=2)

    killed = build(tmp_path, prior, emb)
    real_step = killed.step

    def step_then_die():
        if killed.step_idx == 3:
            raise RuntimeError("killed")
        return real_step()

    killed.step = step_then_die
    ctx = loop_ctx(tmp_path / "killed")
    fresh_starts = []
    with pytest.raises(RuntimeError, match="killed"):
        run_resumable(ctx, killed, 5, every=2, fresh_start=lambda: fresh_starts.append("killed"))
    resumed = build(tmp_path, prior, emb)
    ctx = loop_ctx(tmp_path / "killed")
    run_resumable(ctx, resumed, 5, every=2, fresh_start=lambda: fresh_starts.append("resumed"))

    assert ctx.metrics["resumed_from"] == 2 and resumed.step_idx == 5
    assert fresh_starts == ["killed"]  # refine's LoRA warm-up runs once, not again on resume
    assert resumed.history == straight.history and [r["step"] for r in resumed.history] == list(range(5))
    want, _ = straight.state()
    got, _ = resumed.state()
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert torch.equal(value, got[name]), name
    for optimizer, end_factor in resumed.lr_decay:  # decayed to the last step's rate, resumed or not
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(group["base_lr"] * end_factor)


def test_run_resumable_decays_learning_rates_and_checkpoints_every_n_steps(tmp_path, tiny):
    prior, emb = tiny
    trainer = _coarse(tmp_path, prior, emb)
    saved = []
    ctx = loop_ctx(tmp_path / "loop")
    ctx.checkpoint_sync = lambda: saved.append(trainer.step_idx)
    rates = []
    real_step = trainer.step

    def record_lr():
        rates.append(trainer.opt.param_groups[0]["lr"])
        return real_step()

    trainer.step = record_lr
    run_resumable(ctx, trainer, 5, every=2)
    base = trainer.p.lr_grid
    assert rates == pytest.approx([base * 0.3 ** (i / 4) for i in range(5)])
    assert saved == [2, 4] and "resumed_from" not in ctx.metrics


def test_every_random_stream_derives_from_the_flow_seed(tmp_path, tiny):
    """The flow's seed sets the initial weights too (there is no second seed), and streams are independent."""
    prior, emb = tiny
    first, again = _coarse(tmp_path, prior, emb), _coarse(tmp_path, prior, emb)
    other = CoarseTrainer(first.p, prior, emb, _camera(), CPU_GRID, seed=4)
    assert torch.equal(first.field.encoding.params, again.field.encoding.params)
    assert not torch.equal(first.field.encoding.params, other.field.encoding.params)
    assert not torch.equal(first.field.mlp[0].weight, other.field.mlp[0].weight)
    seeds = {stream_seed(3, stage, stream) for stage in ("coarse", "refine") for stream in ("noise", "field", "lora")}
    assert len(seeds) == 6 and all(0 <= s < 2**31 for s in seeds)
    ctx = loop_ctx(tmp_path / "ctx", "coarse", seed=3)
    assert ctx.generator("noise").initial_seed() == stream_seed(3, "coarse", "noise") == first.gen.initial_seed()
    assert "seed" not in first.field.config_dict()
    old = {**first.field.config_dict(), "seed": 7}  # field.json written while FieldParams had a seed
    assert FieldParams.from_saved(old) == first.field.params.model_copy(update={"backend": "auto"})


@pytest.mark.parametrize("build", [_geometry, _texture("sds")], ids=["geometry", "texture"])
def test_geometry_and_texture_heal_a_nan_like_the_field_stages(tmp_path, tiny, build):
    """They used to fail on the first NaN; through run_resumable they roll back and retry."""
    prior, emb = tiny
    trainer = build(tmp_path, prior, emb)
    real_step = trainer.step

    def nan_once_at_3():
        rec = real_step()
        if rec["step"] == 3 and not ctx.metrics.get("poisoned"):
            ctx.metrics["poisoned"] = True
            rec["loss"] = trainer.history[-1]["loss"] = float("nan")
        return rec

    trainer.step = nan_once_at_3
    ctx = loop_ctx(tmp_path / "loop")
    run_resumable(ctx, trainer, 5, every=2)
    assert ctx.metrics["recoveries"] == [{"step": 3, "reason": "loss is nan", "rolled_back_to": 2, "lr_scale": 0.5}]
    assert [r["step"] for r in trainer.history] == list(range(5))
    assert all(math.isfinite(r["loss"]) for r in trainer.history)
