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
