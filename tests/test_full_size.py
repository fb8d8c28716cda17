"""bench/full_size.py's fast path: the full-size priors' parameter counts on the meta device.

The real bench (SD 2.1 and an IF-I-M-sized prior through `t3d run` on the CPU) takes ~20 minutes
and several GiB; CI runs only --dry-run, which allocates nothing.
"""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("full_size_bench", REPO / "bench" / "full_size.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_parameter_counts(capsys):
    out = _bench().main(["--dry-run"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out
    assert out["ok"] is True
    p = out["params"]
    assert p["sd21.unet"] == 865_910_724
    assert p["sd21.vae"] == 83_653_863
    # OpenCLIP ViT-H/14's text tower as SD 2 ships it: 49,408 x 1024 tokens + 77 x 1024 positions
    # + 23 layers x 12,596,224 + the final LayerNorm.
    assert p["sd21.text_encoder"] == 49_408 * 1024 + 77 * 1024 + 23 * 12_596_224 + 2 * 1024 == 340_387_840
    assert p["if_m.unet"] == 371_605_830
    assert p["if_m.text_encoder_full"] == 4_762_310_656  # T5-XXL's encoder, 24 layers
    assert out["if_t5"]["layers_run"] == 2 and out["if_t5"]["fp32_gib_real"] > 12  # why the bench cuts it


def test_dry_run_truncated_t5_is_counted_per_layer():
    from t3d.priors.configs import EXPECTED_PARAMS, t5_layer_params

    out = _bench().main(["--dry-run", "--which", "if", "--t5-layers", "3"])
    assert out["ok"] and set(out["params"]) == {"if_m.text_encoder", "if_m.unet", "if_m.text_encoder_full"}
    assert out["params"]["if_m.text_encoder"] == EXPECTED_PARAMS["if_m.text_encoder"] - 21 * t5_layer_params()


def test_synthetic_tokenizers_have_the_real_vocab_sizes():
    from t3d.priors.configs import SD21_TEXT_ENCODER, synthetic_clip_tokenizer, synthetic_t5_tokenizer

    clip = synthetic_clip_tokenizer()
    assert len(clip) == SD21_TEXT_ENCODER["vocab_size"] == 49_408
    ids = clip(["a hamburger, side view"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert ids[0] == 49_406 and 49_407 in ids and len(ids) == 77 and max(ids) < 49_408
    t5 = synthetic_t5_tokenizer()
    assert len(t5) == 32_100
    assert max(t5(["a hamburger"]).input_ids[0]) < 32_128


def test_flow_is_valid_for_the_schema(tmp_path):
    """The YAML the bench writes passes t3d's own config validation."""
    from t3d.flows.config import load_config
    from t3d.stages import registry_from_env

    bench = _bench()
    prior = tmp_path / "prior"
    prior.mkdir()
    for kind in ("sd21", "if"):
        flow = tmp_path / f"flow-{kind}.yaml"
        flow.write_text(bench.flow_yaml(kind, prior, tmp_path / "store", steps=2, refine=True))
        cfg = load_config(flow, [], registry_from_env())
        assert cfg.device == "cpu" and cfg.stages.coarse.resolution == 64 and cfg.stages.refine.enabled


@pytest.mark.parametrize("bad", [["--which", "sdxl", "--dry-run"], ["--t5-layers", "0", "--dry-run"]])
def test_bad_arguments(bad):
    with pytest.raises(SystemExit):
        _bench().main(bad)
