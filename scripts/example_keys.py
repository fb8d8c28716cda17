"""Print the planned artifact keys of every example flow as JSON (no model, no GPU): diff two
commits' output to see which keys a change moves."""

import json
import sys
import tempfile
from pathlib import Path

from t3d.flows.config import load_config
from t3d.runner import plan
from t3d.stages import default_registry
from t3d.store import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    registry = default_registry()
    store = ArtifactStore(tempfile.mkdtemp(prefix="t3d-keys-"))
    out = {}
    for flow in sorted((ROOT / "examples").glob("*.yaml")):
        cfg = load_config(flow, registry=registry)
        for prompt in cfg.prompt_list():
            out[f"{flow.name}:{prompt}"] = {p.name: p.key for p in plan(cfg, prompt, registry, store)}
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
