"""Flow config validation: every malformed flow gets one error naming the file and the key."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from t3d.flows.config import ConfigError, apply_overrides, load_config, validate
from t3d.stages import default_registry

REG = default_registry()

GOOD = """
prompt: a red cube
seed: 3
stages:
  encode_prompt:
    views: [front, back]
"""


def write(tmp_path, text, name="flow.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_good_flow_loads_with_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), registry=REG)
    assert cfg.prompt == "a red cube" and cfg.seed == 3
    assert cfg.stages.encode_prompt.views == ["front", "back"]
    assert cfg.prior == "embedded" and cfg.device == "auto"
    assert cfg.enabled_stages() == [n for n in REG if n != "refine"], "refine (VSD) is opt-in"


def test_set_overrides_parse_as_yaml(tmp_path):
    cfg = load_config(
        write(tmp_path, GOOD), ["seed=7", "stages.encode_prompt.views=[side]", "negative_prompt=blurry"], registry=REG
    )
    assert cfg.seed == 7 and cfg.stages.encode_prompt.views == ["side"] and cfg.negative_prompt == "blurry"


def test_relative_store_is_relative_to_the_flow_file(tmp_path):
    (tmp_path / "sub").mkdir()
    cfg = load_config(write(tmp_path, GOOD + "store: ./arts\n", "sub/flow.yaml"), registry=REG)
    assert cfg.store == str((tmp_path / "sub" / "arts").resolve())


# (yaml text, --set overrides, substrings the single error must contain)
MALFORMED = [
    ("promt: a red cube\n", [], ["promt", "did you mean 'prompt'"]),
    ("prompt: a red cube\nsede: 1\n", [], ["sede", "did you mean 'seed'"]),
    ("prompt: ''\n", [], ["prompt is empty"]),
    ("prompt: '   '\n", [], ["prompt is empty"]),
    ("seed: 1\n", [], ["prompt"]),
    ("prompt: a\nprompts: [b]\n", [], ["either `prompt` or `prompts`"]),
    ("prompts: [a red cube, '']\n", [], ["prompts[1] is empty"]),
    ("prompt: a red cube\nseed: abc\n", [], ["'seed'", "integer", "'abc'"]),
    ("prompt: a red cube\nseed: -1\n", [], ["'seed'", "greater than or equal to 0"]),
    ("prompt: a red cube\ndevice: tpu\n", [], ["'device'", "'auto', 'cpu' or 'cuda'"]),
    ("prompt: a red cube\nstages:\n  encod_prompt: {}\n", [], ["stages.encod_prompt", "did you mean 'encode_prompt'"]),
    (
        "prompt: a red cube\nstages:\n  encode_prompt:\n    veiws: [front]\n",
        [],
        ["stages.encode_prompt.veiws", "did you mean 'views'"],
    ),
    (
        "prompt: a red cube\nstages:\n  encode_prompt:\n    views: [top]\n",
        [],
        ["stages.encode_prompt.views", "unknown view", "top"],
    ),
    ("prompt: a red cube\nstages:\n  encode_prompt:\n    views: front\n", [], ["stages.encode_prompt.views", "list"]),
    (
        "prompt: a red cube\nstages:\n  encode_prompt:\n    enabled: maybe\n",
        [],
        ["stages.encode_prompt.enabled", "boolean"],
    ),
    ("prompt: a red cube\nstages: [encode_prompt]\n", [], ["'stages'"]),
    ("prompt: a red cube\ncamera:\n  fov_deg: 200\n", [], ["camera.fov_deg", "less than 180"]),
    ("prompt: a red cube\ncamera:\n  radus: 2\n", [], ["camera.radus", "did you mean 'radius'"]),
    ("prompt: a red cube\nseed: [1, 2]\n", [], ["'seed'"]),
    ("prompt: a red cube\nseeds: abc\n", [], ["'seeds': give a count from 1 to 64"]),
    ("prompt: a red cube\nseeds: [1, x]\n", [], ["'seeds': give a count from 1 to 64"]),
    ("prompt: a red cube\nseeds: true\n", [], ["'seeds': give a count from 1 to 64"]),
    ("prompt: a red cube\nseeds: 0\n", [], ["'seeds': give a count from 1 to 64"]),
    ("prompt: a red cube\nseeds: [3, 3]\n", [], ["'seeds': give distinct seeds"]),
    ("prompt: a red cube\n", ["outputs="], ["'outputs': is empty", "outputs: ./outputs"]),
    ("- a red cube\n- a blue cone\n", [], ["top level must be a mapping"]),
    (
        "prompt: a red cube\n",
        ["stages.encode_prompt.viewz=[front]"],
        ["stages.encode_prompt.viewz", "did you mean 'views'"],
    ),
    ("prompt: a red cube\n", ["seed=x1"], ["'seed'", "'x1'"]),
    ("prompt: a red cube\n", ["prompt.text=x"], ["--set prompt.text=x", "prompt is a value"]),
    ("prompt: a red cube\n", ["seed"], ["--set 'seed'", "KEY=VALUE"]),
    (
        "prompt: a red cube\nstages:\n  coarse: {method: sjc}\n",
        [],
        ["stages.coarse.method: renamed to stages.coarse.guidance"],
    ),
    (
        "prompt: a red cube\nstages:\n  coarse: {occupancy_threshold: 0.01}\n",
        [],
        ["stages.coarse.occupancy_threshold: renamed to stages.coarse.occupancy_alpha"],
    ),
    (
        "prompt: a red cube\nstages:\n  extract_mesh: {geometry_laplacian: 1.0}\n",
        [],
        ["stages.extract_mesh.geometry_laplacian: renamed to stages.extract_mesh.geometry.lambda_laplacian"],
    ),
    (
        "prompt: a red cube\n",
        ["stages.extract_mesh.geometry_steps=0"],
        ["stages.extract_mesh.geometry_steps: renamed to stages.extract_mesh.geometry.steps"],
    ),
    ("prompt: a red cube\nbackends: {raster: cuda-library}\n", [], ["'backends.raster'", "'nvdiffrast' or 'torch'"]),
    ("prompt: a red cube\nbackends: {hashgird: torch}\n", [], ["backends.hashgird", "did you mean 'hashgrid'"]),
    (
        "prompt: a red cube\ndevice: cpu\nbackends: {hashgrid: tinycudann}\n",
        [],
        ["backends.hashgrid: tinycudann needs CUDA, but device is cpu"],
    ),
]


@pytest.mark.parametrize("text,overrides,expected", MALFORMED, ids=[f"case{i}" for i in range(len(MALFORMED))])
def test_malformed_flow_names_the_key(tmp_path, text, overrides, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, registry=REG)
    message = str(info.value)
    if not message.startswith("--set"):
        assert str(path) in message, message
    for part in expected:
        assert part in message, f"{part!r} not in: {message}"
    assert "\n" not in message, "one line"


def test_yaml_syntax_error_gives_line_number(tmp_path):
    path = write(tmp_path, "prompt: a red cube\nstages:\n  encode_prompt: {views: [front\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, registry=REG)
    assert str(path) in str(info.value) and "YAML syntax error at line" in str(info.value)


def test_tab_indentation_is_a_syntax_error(tmp_path):
    path = write(tmp_path, "prompt: a red cube\nstages:\n\tencode_prompt: {}\n")
    with pytest.raises(ConfigError, match=r"line 3"):
        load_config(path, registry=REG)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml", registry=REG)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path, registry=REG)


def test_empty_file_says_prompt_is_required(tmp_path):
    with pytest.raises(ConfigError, match="prompt"):
        load_config(write(tmp_path, ""), registry=REG)


def test_override_into_missing_section_creates_it():
    data = apply_overrides({"prompt": "x"}, ["stages.encode_prompt.views=[front]"])
    assert data["stages"]["encode_prompt"]["views"] == ["front"]


def test_nested_geometry_block_reaches_the_stage(tmp_path):
    cfg = load_config(
        write(tmp_path, GOOD + "  extract_mesh: {geometry: {steps: 0, lambda_anchor: 2.0}}\n"),
        ["stages.extract_mesh.geometry.resolution=32"],
        registry=REG,
    )
    geometry = cfg.stages.extract_mesh.geometry
    assert (geometry.steps, geometry.lambda_anchor, geometry.resolution, geometry.lr) == (0, 2.0, 32, 2e-3)


def test_renamed_key_is_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import sys

    from t3d.cli.main import main

    monkeypatch.chdir(tmp_path)
    write(tmp_path, "prompt: a red cube\nprior: tiny-pixel\nstages:\n  extract_mesh: {geometry_steps: 50}\n")
    monkeypatch.setattr(sys, "argv", ["t3d", "run", "flow.yaml", "--no-prefect"])
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    errors = [line for line in (out + err).splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in out + err
    assert errors == [
        "error: flow.yaml: stages.extract_mesh.geometry_steps: renamed to stages.extract_mesh.geometry.steps"
    ]


# ---- backends: one flow-level block, outside the keys --------------------------------------------
def test_backends_block_defaults_to_auto_and_takes_library_names(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), registry=REG)
    assert cfg.backends.model_dump() == {"hashgrid": "auto", "raster": "auto"}
    cfg = load_config(write(tmp_path, GOOD + "backends: {hashgrid: tinycudann, raster: torch}\n"), registry=REG)
    assert cfg.backends.hashgrid == "tinycudann" and cfg.backends.raster == "torch"


@pytest.mark.parametrize(
    "text,overrides,expected",
    [
        (
            "stages:\n  texture: {raster_backend: torch}\n",
            [],
            "'stages.texture.raster_backend' moved to 'backends.raster' (one choice for the whole flow): "
            "write `backends: {raster: torch}` at the top level instead",
        ),
        (
            "stages:\n  coarse:\n    field: {backend: cuda-library, hidden: 32}\n",
            [],
            "'stages.coarse.field.backend' moved to 'backends.hashgrid' (one choice for the whole flow): "
            "write `backends: {hashgrid: tinycudann}` at the top level instead",
        ),
        (
            "",
            ["stages.extract_mesh.raster_backend=cuda-library"],
            "'stages.extract_mesh.raster_backend' moved to 'backends.raster' (one choice for the whole flow): "
            "write `backends: {raster: nvdiffrast}` at the top level instead",
        ),
    ],
)
def test_old_backend_keys_name_their_new_place(tmp_path, text, overrides, expected):
    path = write(tmp_path, "prompt: a red cube\n" + text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, registry=REG)
    assert str(info.value) == f"{path}: {expected}"


def test_old_backend_key_exits_2_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from t3d.cli.main import app

    path = write(tmp_path, "prompt: a red cube\nstages:\n  export: {raster_backend: auto}\n")
    res = CliRunner().invoke(app, ["run", str(path), "--no-prefect"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "'stages.export.raster_backend' moved to 'backends.raster'" in lines[0], res.output


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_a_library_backend_without_cuda_fails_before_any_stage_runs(tmp_path, monkeypatch):
    """device auto on a CPU machine: the run must stop at once, not after minutes of coarse work
    when extract_mesh first asks for nvdiffrast."""
    from typer.testing import CliRunner

    from t3d.cli.main import app

    monkeypatch.chdir(tmp_path)
    write(tmp_path, "prompt: a red cube\nprior: tiny-pixel\nbackends: {raster: nvdiffrast}\n")
    res = CliRunner().invoke(app, ["run", "flow.yaml", "--no-prefect"])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == (
        "error: flow.yaml: 'backends.raster: nvdiffrast' needs CUDA, but torch sees no CUDA device here; "
        "use auto or torch there"
    )
    assert not (tmp_path / "artifacts" / "objects").exists()


def test_backends_block_is_outside_the_artifact_keys(tmp_path):
    from t3d.runner import plan
    from t3d.store import ArtifactStore

    store = ArtifactStore(tmp_path / "store")
    flow = "prompt: a red cube\ndevice: cuda\nstages: {refine: {enabled: true}}\n"
    default = load_config(write(tmp_path, flow), registry=REG)
    other = load_config(
        write(tmp_path, flow + "backends: {hashgrid: tinycudann, raster: nvdiffrast}\n", "other.yaml"), registry=REG
    )
    keys = [{p.name: p.key for p in plan(cfg, "a red cube", REG, store)} for cfg in (default, other)]
    assert keys[0] == keys[1] and len(keys[0]) == len(REG)


def _record_backends(ctx):
    """A stage that rasterizes nothing: it reports the backend objects the runner handed it."""
    ctx.backend.update(hashgrid=ctx.backends.hashgrid.choice.as_dict(), raster=ctx.backends.raster.choice.as_dict())
    (ctx.out / "devices.txt").write_text(f"{ctx.backends.hashgrid.device} {ctx.backends.raster.device}")


def test_runner_hands_the_flow_backends_to_each_stage(tmp_path):
    from t3d.runner import execute, plan
    from t3d.stage import Stage, StageParams
    from t3d.stages import StageRegistry
    from t3d.store import ArtifactStore

    registry = StageRegistry([Stage("probe", "1", StageParams, (), _record_backends, uses_prior=False)])
    store = ArtifactStore(tmp_path / "store")
    manifests = {}
    for request in ("torch", "auto"):
        data = {"prompt": "a red cube", "device": "cpu", "backends": {"hashgrid": request, "raster": request}}
        cfg = validate(data, registry)
        (step,) = plan(cfg, cfg.prompt, registry, store)
        step.forced = True  # same key for both requests: run it again
        result = execute(cfg, cfg.prompt, step, registry, store, show_progress=False)
        manifests[request] = store.get(result.key).manifest["backend"]
        assert (Path(result.path) / "devices.txt").read_text() == "cpu cpu"
    threads = manifests["torch"].pop("torch_threads")  # recorded, not keyed (t3d/runner.py)
    assert isinstance(threads, int) and threads >= 1
    if (os.cpu_count() or 1) <= 2 and not os.environ.get("T3D_TORCH_THREADS"):
        assert threads == 1  # the shared-2-core default
    assert manifests["torch"] == {
        "hashgrid": {"library": "tinycudann", "backend": "torch", "reason": "requested"},
        "raster": {"library": "nvdiffrast", "backend": "torch", "reason": "requested"},
    }
    assert manifests["auto"]["raster"] == {"library": "nvdiffrast", "backend": "torch", "reason": "device is cpu"}


def test_words_the_embedded_prior_ignores_are_named_before_the_run(tmp_path):
    from t3d.flows.config import prompt_warnings
    from t3d.priors.toy import unknown_words

    assert unknown_words("A purple Cube, front view!") == ["purple", "!"]
    assert unknown_words("a red cube with a black spot, back view") == []
    cfg = load_config(write(tmp_path, GOOD), registry=REG)
    lines = prompt_warnings(cfg, ["a red cube", "a purple thing", "a blue sphere"])
    assert len(lines) == 1
    assert lines[0].startswith("'a purple thing': the embedded prior does not know 'purple', 'thing'")
    tiny = load_config(write(tmp_path, "prompt: a purple thing\nprior: tiny-pixel\n", "tiny.yaml"), registry=REG)
    assert prompt_warnings(tiny, ["a purple thing"]) == [], "a real tokenizer has no unknown words to report"


def test_batch_table_shows_the_last_stages_quality():
    from t3d.cli.main import _final_quality

    metrics = {"coarse.iou": 0.82, "coarse.color_err": 0.1, "export.iou": 0.8752, "export.color_err": 0.0518}
    assert _final_quality(metrics) == "0.875 / 0.052"
    assert _final_quality({"coarse.iou": 0.82}) == "0.820 / -"
    assert _final_quality({"export.faces": 10}) == ""
