"""Every shipped example flow validates against the stages this version has."""

from pathlib import Path

import pytest

from t3d.flows.config import load_config
from t3d.stages import default_registry

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


def test_there_are_examples():
    assert EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_validates(path):
    cfg = load_config(path, registry=default_registry())
    assert cfg.prompt_list() and cfg.enabled_stages()[0] == "encode_prompt"


def _written(block: dict, prefix: str = "") -> set[str]:
    """Dotted names of the keys written in a YAML block, nested mappings expanded."""
    names = set()
    for name, value in block.items():
        names |= _written(value, f"{prefix}{name}.") if isinstance(value, dict) else {prefix + name}
    return names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_stage_param_an_example_sets_is_in_its_key(path):
    """An example that sets a value the stage then ignores teaches the wrong thing (tests/test_live_keys.py
    shows that every key param is read)."""
    import yaml

    cfg = load_config(path, registry=default_registry())
    for name, block in (yaml.safe_load(path.read_text()).get("stages") or {}).items():
        key = _written(getattr(cfg.stages, name).key_params())
        assert _written(block) - {"enabled", "executor"} <= key, f"{path.name}: stages.{name}"
