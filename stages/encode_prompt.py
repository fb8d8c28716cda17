"""encode_prompt: text -> embeddings for the prompt, the negative prompt and each view direction.

The artifact store is the cache: the same prompt with the same prior never encodes twice.
Downstream stages pick per-camera embeddings with `PromptEmbeddings.for_views`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import field_validator
from safetensors.torch import load_file, save_file

from t3d.render.cameras import VIEW_SUFFIXES, view_prompt
from t3d.stage import Stage, StageContext, StageParams

FILE = "embeddings.safetensors"


class EncodePromptParams(StageParams):
    views: list[str] = list(VIEW_SUFFIXES)

    @field_validator("views")
    @classmethod
    def _known_views(cls, views: list[str]) -> list[str]:
        unknown = [v for v in views if v not in VIEW_SUFFIXES]
        if unknown:
            raise ValueError(f"unknown view(s) {unknown}; choose from {list(VIEW_SUFFIXES)}")
        return views


def run(ctx: StageContext) -> None:
    prior = ctx.load_prior()
    texts = {"cond": ctx.prompt, "uncond": ctx.negative_prompt}
    texts.update({f"view.{v}": view_prompt(ctx.prompt, v) for v in ctx.params.views})
    names = list(texts)
    emb = prior.encode_text([texts[n] for n in names]).float().cpu()
    save_file({n: emb[i : i + 1].contiguous() for i, n in enumerate(names)}, str(ctx.out / FILE))
    (ctx.out / "prompts.json").write_text(json.dumps(texts, indent=2))
    ctx.metrics.update({"n_texts": len(names), "tokens": int(emb.shape[1]), "dim": int(emb.shape[2])})


@dataclass
class PromptEmbeddings:
    cond: torch.Tensor  # [1, L, D]
    uncond: torch.Tensor  # [1, L, D]
    views: dict[str, torch.Tensor]  # view name -> [1, L, D]
    texts: dict[str, str]

    def for_views(self, names: list[str]) -> torch.Tensor:
        """[B, L, D] embeddings, one per camera's view name (falls back to the plain prompt)."""
        return torch.cat([self.views.get(n, self.cond) for n in names])

    def uncond_batch(self, n: int) -> torch.Tensor:
        return self.uncond.expand(n, -1, -1)

    def to(self, device, dtype=None) -> PromptEmbeddings:
        mv = lambda t: t.to(device=device, dtype=dtype or t.dtype)  # noqa: E731
        return PromptEmbeddings(mv(self.cond), mv(self.uncond), {k: mv(v) for k, v in self.views.items()}, self.texts)


def load_embeddings(folder: Path) -> PromptEmbeddings:
    tensors = load_file(str(Path(folder) / FILE))
    texts = json.loads((Path(folder) / "prompts.json").read_text())
    views = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("view.")}
    return PromptEmbeddings(tensors["cond"], tensors["uncond"], views, texts)


STAGE = Stage(
    name="encode_prompt",
    version="1",
    params=EncodePromptParams,
    inputs=(),
    run=run,
    uses_prompt=True,
    uses_seed=False,
    description="prompt, negative prompt and view-dependent prompts -> text embeddings",
)
