"""VSD: the LoRA trains while the prior stays frozen, the camera matters, resume is exact."""

from __future__ import annotations

import torch

from t3d.fields.nerf import FieldParams, NeRFField, save_field
from t3d.guidance.vsd import camera_condition, lora_state, make_lora_unet
from t3d.priors import build_tiny_prior
from t3d.render.cameras import CameraParams
from t3d.stage import load_checkpoint, run_resumable, save_checkpoint
from t3d.stages.encode_prompt import PromptEmbeddings
from t3d.stages.refine import RefineParams, VSDTrainer, particle_distance
from tests.grids import CPU_GRID, TINY_GRID
from tests.test_recovery import loop_ctx


def _setup(tmp_path, particles=1):
    prior = build_tiny_prior("pixel", seed=0, image_size=16)
    texts = [
        "a red cube",
        "",
        "a red cube, front view",
        "a red cube, side view",
        "a red cube, back view",
        "a red cube, overhead view",
    ]
    e = prior.encode_text(texts).float()
    emb = PromptEmbeddings(e[0:1], e[1:2], {"front": e[2:3], "side": e[3:4], "back": e[4:5], "overhead": e[5:6]}, {})
    field = NeRFField(FieldParams(grid=TINY_GRID, hidden=16), CPU_GRID)
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_field(field, tmp_path)
    params = RefineParams(steps=4, particles=particles, batch_size=1, resolution=16, n_samples=8, lora_rank=2)
    return prior, emb, params


def _trainer(tmp_path, prior, emb, params, seed=0):
    return VSDTrainer(params, prior, emb, tmp_path, CameraParams(), CPU_GRID, seed)


def test_lora_trains_and_base_weights_stay_frozen(tmp_path):
    prior, emb, params = _setup(tmp_path)
    base_before = {k: v.clone() for k, v in prior.unet.state_dict().items()}
    trainer = _trainer(tmp_path, prior, emb, params)
    lora_before = {k: v.clone() for k, v in lora_state(trainer.lora).items()}
    frozen_in_copy = {k: v.clone() for k, v in trainer.lora.named_parameters() if k not in lora_before}
    for _ in range(3):
        rec = trainer.step()
        assert torch.isfinite(torch.tensor(rec["loss"])) and rec["lora_loss"] > 0
    for k, v in prior.unet.state_dict().items():
        assert torch.equal(v, base_before[k]), f"pretrained weight {k} changed"
    for k, v in trainer.lora.named_parameters():
        if k in frozen_in_copy:
            assert torch.equal(v, frozen_in_copy[k]), f"frozen LoRA-copy weight {k} changed"
    changed = [k for k, v in lora_state(trainer.lora).items() if not torch.equal(v, lora_before[k])]
    assert any("lora_B" in k for k in changed) and any(k.startswith("class_embedding") for k in changed)
    assert all(not p.requires_grad for p in prior.unet.parameters())


def test_camera_embedding_changes_the_lora_prediction():
    prior = build_tiny_prior("pixel", seed=0, image_size=16)
    lora = make_lora_unet(prior.unet, rank=2)
    with torch.no_grad():
        for p in lora.class_embedding.parameters():
            p.normal_(0, 0.5)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([400])
    cond = prior.encode_text(["a red cube"])
    c2w_a = torch.eye(4)[None]
    c2w_b = c2w_a.clone()
    c2w_b[0, :3, 3] = torch.tensor([0.0, 2.5, 0.5])
    eps_a = prior.predict_noise(x, t, cond, None, unet=lora, class_labels=camera_condition(c2w_a))
    eps_b = prior.predict_noise(x, t, cond, None, unet=lora, class_labels=camera_condition(c2w_b))
    assert (eps_a - eps_b).abs().max() > 1e-3


def test_resume_restores_fields_lora_and_optimizers(tmp_path):
    prior, emb, params = _setup(tmp_path / "coarse")
    straight = _trainer(tmp_path / "coarse", prior, emb, params)
    for _ in range(4):
        straight.step()

    first = _trainer(tmp_path / "coarse", prior, emb, params)
    first.step()
    first.step()
    save_checkpoint(tmp_path / "ckpt", first.step_idx, *first.state())
    resumed = _trainer(tmp_path / "coarse", prior, emb, params)
    resumed.load_state(*load_checkpoint(tmp_path / "ckpt"))
    assert resumed.step_idx == 2 and len(resumed.history) == 2
    resumed.step()
    resumed.step()
    for a, b in zip(straight.fields[0].parameters(), resumed.fields[0].parameters()):
        torch.testing.assert_close(a, b)
    for k, v in lora_state(straight.lora).items():
        torch.testing.assert_close(v, lora_state(resumed.lora)[k])
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]


def test_particles_diverge(tmp_path):
    prior, emb, params = _setup(tmp_path, particles=2)
    trainer = _trainer(tmp_path, prior, emb, params)
    assert particle_distance(trainer.fields, CameraParams(), size=16, n_views=2) == 0.0
    for _ in range(3):
        trainer.step()
    assert particle_distance(trainer.fields, CameraParams(), size=16, n_views=2) > 0.0


def test_lora_warm_up_moves_only_the_lora(tmp_path):
    """Warm-up fits the LoRA to the current renders and leaves the fields where they were."""
    prior, emb, params = _setup(tmp_path)
    trainer = _trainer(tmp_path, prior, emb, params)
    field_before = {k: v.clone() for k, v in trainer.fields[0].state_dict().items()}
    lora_before = {k: v.clone() for k, v in lora_state(trainer.lora).items()}
    calls = []
    losses = trainer.warm_up_lora(3, update=lambda n, **kw: calls.append(kw["lora"]))
    assert len(losses) == 3 and calls == losses and all(x > 0 for x in losses)
    assert all(torch.equal(v, field_before[k]) for k, v in trainer.fields[0].state_dict().items())
    assert any(not torch.equal(v, lora_before[k]) for k, v in lora_state(trainer.lora).items())
    assert trainer.step_idx == 0 and trainer.history == []


def test_field_learning_rate_decays_to_the_end_factor_and_the_lora_rate_stays(tmp_path):
    prior, emb, params = _setup(tmp_path)
    params = params.model_copy(update={"lr_end_factor": 0.1})
    trainer = _trainer(tmp_path, prior, emb, params)
    run_resumable(loop_ctx(tmp_path / "loop", "refine"), trainer, params.steps, every=100)
    grid, mlp = trainer.field_opt.param_groups[:2]
    assert abs(grid["lr"] - params.lr_grid * 0.1) < 1e-12 and abs(mlp["lr"] - params.lr_mlp * 0.1) < 1e-12
    assert trainer.lora_opt.param_groups[0]["lr"] == params.lora_lr


def test_lora_copy_shares_the_frozen_base_weights():
    """The LoRA branch adds adapters, not a second copy of the prior's weights (3.5 GB at SD 2.1 size)."""
    prior = build_tiny_prior("pixel", seed=0, image_size=16)
    lora = make_lora_unet(prior.unet, rank=2)
    base = {p.data_ptr() for p in prior.unet.parameters()}
    trained = {n for n, _ in lora_state(lora).items()}
    shared = {n for n, p in lora.named_parameters() if p.data_ptr() in base}
    assert len(shared) == len(base) and not (shared & trained)
    assert not any("lora_" in n for n, _ in prior.unet.named_parameters()) and prior.unet.class_embedding is None
