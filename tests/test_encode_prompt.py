"""encode_prompt on a real (tiny, random-weight) text encoder: views differ, the store is the cache."""

from __future__ import annotations

import torch

from t3d.flows.config import validate
from t3d.flows.flow import run_prompt
from t3d.priors import build_tiny_prior
from t3d.stages import StageRegistry, default_registry
from t3d.stages.encode_prompt import load_embeddings


def test_encode_prompt_writes_view_embeddings_and_is_cached(tmp_path, monkeypatch):
    reg = StageRegistry([default_registry()["encode_prompt"]])
    cfg = validate(
        {"prompt": "a red cube", "negative_prompt": "blurry", "prior": "tiny-pixel", "store": str(tmp_path)}, reg
    )
    first = run_prompt(cfg, cfg.prompt, reg, use_prefect=False, show_progress=False)
    assert first.state == "completed", first.error
    emb = load_embeddings(first.results[0].path)
    assert emb.texts["view.back"] == "a red cube, back view" and emb.texts["uncond"] == "blurry"
    assert set(emb.views) == {"front", "side", "back", "overhead"}
    assert emb.cond.shape[0] == 1 and emb.cond.ndim == 3
    assert not torch.allclose(emb.views["front"], emb.views["back"]), "view suffix must change the embedding"
    assert not torch.allclose(emb.cond, emb.uncond)
    # Same numbers as encoding directly with the same prior.
    prior = build_tiny_prior("pixel", seed=0)
    direct = prior.encode_text(["a red cube, side view"]).float()
    torch.testing.assert_close(emb.views["side"], direct)
    batch = emb.for_views(["front", "back", "front"])
    assert batch.shape[0] == 3 and torch.equal(batch[0], batch[2])

    def no_encoding(*args, **kwargs):
        raise AssertionError("a cached prompt must not be encoded again")

    monkeypatch.setattr("t3d.priors.base.DiffusionPrior.encode_text", no_encoding)
    second = run_prompt(cfg, cfg.prompt, reg, use_prefect=False, show_progress=False)
    assert second.state == "cached"
    manifest = second.results[0]
    assert manifest.metrics["n_texts"] == 6
