"""The stage registry: which stages exist and their order in a flow.

Each stage module defines `STAGE = Stage(...)`, in a file named after its key. The order below is
the pipeline order; T3D_STAGE_REGISTRY swaps in another registry (plugins, tests).
"""

from __future__ import annotations

import importlib
import os
from collections import OrderedDict

from t3d.stage import Stage

PIPELINE = [
    ("encode_prompt", "t3d.stages.encode_prompt"),
    ("coarse", "t3d.stages.coarse"),
    ("refine", "t3d.stages.refine"),
    ("extract_mesh", "t3d.stages.extract_mesh"),
    ("texture", "t3d.stages.texture"),
    ("export", "t3d.stages.export"),
]


class StageRegistry(OrderedDict):
    """name -> Stage, in pipeline order. `spec` ("module:attr") says where a Prefect flow, which
    takes only JSON-able parameters, loads the same registry from (registry_from_spec)."""

    spec: str | None = None

    def __init__(self, stages: list[Stage] | None = None):
        super().__init__()
        for stage in stages or []:
            self.add(stage)

    def add(self, stage: Stage) -> None:
        for dep in stage.inputs:  # optional inputs may be absent from a registry
            if dep not in self:
                raise ValueError(f"stage {stage.name!r} consumes {dep!r}, which must be registered before it")
        self[stage.name] = stage


DEFAULT_SPEC = "t3d.stages:default_registry"


def default_registry() -> StageRegistry:
    reg = StageRegistry()
    for name, module in PIPELINE:
        stage = importlib.import_module(module).STAGE
        assert stage.name == name, f"{module} declares {stage.name!r}, expected {name!r}"
        reg.add(stage)
    reg.spec = DEFAULT_SPEC
    return reg


def registry_from_spec(spec: str) -> StageRegistry:
    """The registry named by "module:attr" (attr: a registry or a function returning one)."""
    module, _, attr = spec.partition(":")
    reg = getattr(importlib.import_module(module), attr or "REGISTRY")
    reg = reg() if callable(reg) else reg
    if isinstance(reg, StageRegistry):
        reg.spec = spec
    return reg


def registry_from_env() -> StageRegistry:
    """T3D_STAGE_REGISTRY=module:attr swaps in another registry (plugins, tests)."""
    return registry_from_spec(os.environ.get("T3D_STAGE_REGISTRY") or DEFAULT_SPEC)
