"""No key that changes nothing: every param that enters a stage's artifact key is read by the stage
while it runs. Each example flow runs at tiny sizes (its own choices kept: guidance method, refine
on, geometry refinement on), plus the plain marching-cubes path, with params that note each field
the stage code reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from t3d.flows.config import apply_overrides, validate
from t3d.flows.flow import run_prompt
from t3d.stages import StageRegistry, default_registry
from t3d.stages.coarse import CoarseParams
from t3d.stages.extract_mesh import ExtractMeshParams
from t3d.stages.texture import TextureParams

EXAMPLES = Path(__file__).parents[1] / "examples"

# Sizes only, so each flow's own choices stay as the example wrote them.
TINY = [
    "prompt=a red cube",  # one prompt for all: encode_prompt and equal coarse keys are computed once
    "prior=tiny-pixel",
    "stages.coarse.steps=2",
    "stages.coarse.batch_size=1",
    "stages.coarse.resolution=16",
    "stages.coarse.n_samples=8",
    "stages.coarse.checkpoint_every=1",
    "stages.coarse.preview_frames=4",
    "stages.coarse.preview_size=16",
    "stages.coarse.eval_views=1",
    "stages.refine.steps=2",
    "stages.refine.batch_size=1",
    "stages.refine.resolution=16",
    "stages.refine.n_samples=8",
    "stages.refine.lora_warmup_steps=1",
    "stages.refine.lora_steps_per_step=1",
    "stages.refine.checkpoint_every=1",
    "stages.refine.preview_frames=4",
    "stages.refine.preview_size=16",
    "stages.refine.eval_views=1",
    "stages.extract_mesh.resolution=24",
    "stages.extract_mesh.max_faces=500",
    "stages.extract_mesh.texture_size=64",
    "stages.extract_mesh.preview_frames=4",
    "stages.extract_mesh.preview_size=16",
    "stages.extract_mesh.checkpoint_every=1",
    "stages.extract_mesh.geometry.steps=2",
    "stages.extract_mesh.geometry.resolution=16",
    "stages.extract_mesh.geometry.render_size=16",
    "stages.extract_mesh.geometry.batch_size=1",
    "stages.texture.steps=2",
    "stages.texture.batch_size=1",
    "stages.texture.resolution=16",
    "stages.texture.texture_size=64",
    "stages.texture.checkpoint_every=1",
    "stages.texture.preview_frames=4",
    "stages.texture.preview_size=16",
    "stages.export.turntable_frames=4",
    "stages.export.turntable_size=16",
]

FLOWS = [(p.name, []) for p in sorted(EXAMPLES.glob("*.yaml"))] + [
    ("sds_red_cube.yaml", ["stages.extract_mesh.geometry.steps=0"]),  # plain marching cubes
]


def recording(params: BaseModel, reads: set[str], prefix: str = "") -> BaseModel:
    """A copy of `params` that adds the dotted name of every field read to `reads` (nested models too)."""
    names = set(type(params).model_fields)

    class Recorded(type(params)):
        def __getattribute__(self, name: str):
            if name in names:
                reads.add(prefix + name)
            return super().__getattribute__(name)

    values = {}
    for name in names:
        value = params.__dict__[name]
        values[name] = recording(value, reads, f"{prefix}{name}.") if isinstance(value, BaseModel) else value
    return Recorded.model_construct(**values)


def key_fields(params: BaseModel, key: dict, prefix: str = "") -> set[str]:
    """Dotted names of the fields in `key` (a key_params() dict), nested models expanded."""
    names = set()
    for name, value in key.items():
        field = getattr(params, name)
        if isinstance(field, BaseModel):
            names |= key_fields(field, value, f"{prefix}{name}.")
        else:
            names.add(prefix + name)
    return names


def recording_registry(reads: dict[str, set[str]]) -> StageRegistry:
    """The default stages, each run with recording params; reads[stage] gets what it read."""
    registry = StageRegistry()
    for stage in default_registry().values():

        def run(ctx, stage=stage):
            ctx.params = recording(ctx.params, reads.setdefault(stage.name, set()))
            stage.run(ctx)

        registry.add(dataclasses.replace(stage, run=run))
    return registry


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for all flows: stages whose key an earlier flow computed are cached, not rerun."""
    return tmp_path_factory.mktemp("live-keys") / "store"


@pytest.mark.parametrize("example,extra", FLOWS, ids=[f"{n}{'+' if x else ''}{''.join(x)}" for n, x in FLOWS])
def test_every_key_param_is_read(example, extra, store):
    data = yaml.safe_load((EXAMPLES / example).read_text())
    data = apply_overrides(data, [*TINY, f"store={store}", *extra])
    data.pop("prompts", None)
    reads: dict[str, set[str]] = {}
    registry = recording_registry(reads)
    cfg = validate(data, registry, source=example)
    result = run_prompt(cfg, cfg.prompt, registry, use_prefect=False, show_progress=False)
    assert result.state in ("completed", "cached"), result.error  # cached: an earlier flow had the same keys
    computed = [r.stage for r in result.results if r.state == "computed"]
    assert set(computed) == set(reads)
    for name in computed:
        params = getattr(cfg.stages, name)
        unread = key_fields(params, params.key_params()) - reads[name]
        assert not unread, f"{example}: stages.{name} keys on {sorted(unread)}, which the stage never read"
    if "extract_mesh" in reads:  # the recorder sees the difference between the two paths
        geometry_on = cfg.stages.extract_mesh.geometry.steps > 0
        assert ("resolution" in reads["extract_mesh"]) != geometry_on
        assert ("geometry.lr" in reads["extract_mesh"]) == geometry_on


def test_extract_mesh_resolution_keys_only_marching_cubes():
    on, off = ExtractMeshParams(), ExtractMeshParams(geometry={"steps": 0})
    assert on.model_copy(update={"resolution": 48}).key_params() == on.key_params()
    assert off.model_copy(update={"resolution": 48}).key_params() != off.key_params()
    unused_geometry = off.model_copy(update={"geometry": off.geometry.model_copy(update={"lr": 1.0})})
    assert unused_geometry.key_params() == off.key_params() and off.key_params()["geometry"] == {"steps": 0}
    assert "checkpoint_every" in on.key_params() and "checkpoint_every" not in off.key_params()


def test_options_of_the_guidance_not_chosen_stay_out_of_the_key():
    sds, sjc = CoarseParams(guidance="sds"), CoarseParams(guidance="sjc")
    assert sds.model_copy(update={"sjc_n_noise": 4}).key_params() == sds.key_params()
    assert sjc.model_copy(update={"sjc_n_noise": 4}).key_params() != sjc.key_params()
    assert sjc.model_copy(update={"weighting": "uniform"}).key_params() == sjc.key_params()
    assert sds.model_copy(update={"weighting": "uniform"}).key_params() != sds.key_params()
    tex_sds, tex_vsd = TextureParams(guidance="sds"), TextureParams(guidance="vsd")
    assert tex_sds.model_copy(update={"lora_rank": 8}).key_params() == tex_sds.key_params()
    assert tex_vsd.model_copy(update={"lora_rank": 8}).key_params() != tex_vsd.key_params()
