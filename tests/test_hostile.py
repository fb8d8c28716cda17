"""The red team, kept running: bad flows, stores, priors, prompt files and damaged artifacts each
end in the exit code and the one line a user can act on, never a traceback.

Each case builds its inputs in a fresh folder, runs `t3d ...` in-process through the console
entry point (what the installed `t3d` calls) and checks: exit code, exactly one `error:` line
(for exit 2), the words that name the problem, and no traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from t3d.cli.main import main

FLOW = "prompt: a red cube\nprior: tiny-pixel\nstore: ./store\n"


def flow(text: str = FLOW, name: str = "flow.yaml") -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        (tmp / name).write_bytes(text.encode() if isinstance(text, str) else text)
        return ["run", name, "--no-prefect"]

    return setup


def flow_with(extra: str, *sets: str) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        (tmp / "flow.yaml").write_text(FLOW + extra)
        return ["run", "flow.yaml", "--no-prefect", *[a for s in sets for a in ("--set", s)]]

    return setup


def args(
    *argv: str, files: dict[str, bytes | str] | None = None, dirs: tuple[str, ...] = ()
) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        for d in dirs:
            (tmp / d).mkdir(parents=True, exist_ok=True)
        for rel, body in (files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(body.encode() if isinstance(body, str) else body)
        return list(argv)

    return setup


def prior_folder(index: bytes | str | None, *, unet: bool = True) -> Callable[[Path], list[str]]:
    def setup(tmp: Path) -> list[str]:
        folder = tmp / "myprior"
        folder.mkdir()
        if unet:
            (folder / "unet").mkdir()
        if index is not None:
            (folder / "model_index.json").write_bytes(index.encode() if isinstance(index, str) else index)
        (tmp / "flow.yaml").write_text("prompt: a red cube\nprior: ./myprior\nstore: ./store\n")
        return ["run", "flow.yaml", "--no-prefect"]

    return setup


def artifact_store(tamper: Callable[[Path, dict], None], command: str = "show") -> Callable[[Path], list[str]]:
    """A store with one real artifact (the small test stages), then damaged by `tamper`."""

    def setup(tmp: Path) -> list[str]:
        from t3d.store import ArtifactStore

        store = ArtifactStore(tmp / "store")
        with store.writer("b-0123456789abcdef0123", {"stage": "b"}) as out:
            (out / "value.json").write_text('{"value": 6}')
        manifest_path = tmp / "store" / "objects" / "b-0123456789abcdef0123" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        tamper(tmp / "store", manifest)
        manifest_path.write_text(json.dumps(manifest))
        return (
            [command, "0123456789", "--store", str(tmp / "store")]
            if command == "show"
            else [command, "--store", str(tmp / "store")]
        )

    return setup


def _escape(store: Path, manifest: dict) -> None:
    manifest["files"]["../../../../escaped.txt"] = manifest["files"].pop("value.json")


def _absolute(store: Path, manifest: dict) -> None:
    manifest["files"]["/tmp/t3d-hostile-abs.txt"] = manifest["files"].pop("value.json")


def _emptied(store: Path, manifest: dict) -> None:
    manifest["files"] = {}


def _tampered(store: Path, manifest: dict) -> None:
    (store / "objects" / manifest["key"] / "value.json").write_text('{"value": 7}')


def _corrupt_run_record(store: Path, manifest: dict) -> None:
    (store / "runs").mkdir(exist_ok=True)
    (store / "runs" / "broken.json").write_bytes(b"\x00\xff{not json")


@dataclass
class Case:
    name: str
    setup: Callable[[Path], list[str]]
    words: tuple[str, ...]  # each must appear in the output
    code: int = 2


NESTED = "[" * 20000 + "]" * 20000 + "\n"  # 20,000 levels of nesting

CASES = [
    # -- flow files ------------------------------------------------------------------------
    Case("missing flow file", args("run", "nope.yaml"), ("nope.yaml", "no such file")),
    Case("flow is a folder", args("run", "d", dirs=("d",)), ("is a folder",)),
    Case("unreadable flow file", args("run", "/proc/self/mem"), ("cannot read it",)),
    Case("YAML syntax error", flow("prompt: [a red cube\nseed: 1\n"), ("YAML syntax error", "line")),
    Case("YAML nested 20,000 levels", flow(NESTED), ("nested too deeply",)),
    Case("binary flow file", flow(b"\xff\xfe\x00\x01garbage"), ("not readable as YAML",)),
    Case("top level is a list", flow("- a\n- b\n"), ("top level must be a mapping",)),
    Case("empty flow file", flow(""), ("prompt",)),
    Case("empty prompt", flow("prompt: '  '\nprior: tiny-pixel\n"), ("prompt is empty",)),
    Case("prompt and prompts", flow("prompt: a\nprompts: [b]\nprior: tiny-pixel\n"), ("not both",)),
    Case("misspelt top-level key", flow(FLOW + "sed: 3\n"), ("unknown key 'sed'", "did you mean 'seed'")),
    Case(
        "misspelt stage key",
        flow_with("stages: {coarse: {stepz: 3}}\n"),
        ("stages.coarse.stepz", "did you mean 'steps'"),
    ),
    Case("unknown stage", flow_with("stages: {nosuch: {}}\n"), ("stages.nosuch",)),
    Case("seed not a number", flow_with("", "seed=abc"), ("'seed'",)),
    Case("negative seed", flow_with("", "seed=-1"), ("'seed'", "greater than or equal")),
    Case("unknown device", flow_with("", "device=gpu"), ("'device'", "'auto', 'cpu' or 'cuda'")),
    Case("device cuda without CUDA", flow_with("", "device=cuda"), ("no CUDA device", "device: auto")),
    Case("name with a slash", flow_with("", "name=a/b"), ("'name'", "slug-safe", "'a-b'")),
    Case("name escaping the store", flow_with("", "name=../../../X"), ("'name'", "slug-safe")),
    Case("name with a NUL byte", flow('prompt: a\nprior: tiny-pixel\nname: "a\\0b"\n'), ("'name'", "slug-safe")),
    Case("store empty", flow_with("", "store="), ("'store'", "is empty")),
    Case("store with an unknown protocol", flow_with("", "store=foo://bar"), ("'foo'", "Use a folder or one of")),
    Case(
        "store is a file",
        args("run", "flow.yaml", files={"flow.yaml": "prompt: a\nprior: tiny-pixel\nstore: ./afile\n", "afile": "x"}),
        ("is a file, not a folder",),
    ),
    Case(
        "store under a file",
        args(
            "run",
            "flow.yaml",
            files={"flow.yaml": "prompt: a\nprior: tiny-pixel\nstore: ./afile/store\n", "afile": "x"},
        ),
        ("is a file, not a folder",),
    ),
    Case("store with a NUL byte", flow('prompt: a\nprior: tiny-pixel\nstore: "a\\0b"\n'), ("'store'", "NUL")),
    Case(
        "executor with an unknown key",
        flow_with("executor: {pool: gpu, x: 1}\n"),
        ("executor.x", "Valid keys in executor: pool"),
    ),
    Case("executor pool with spaces", flow_with("executor: {pool: 'a b'}\n"), ("executor.pool",)),
    Case("t_range reversed", flow_with("", "stages.coarse.t_range=[0.9, 0.1]"), ("t_range", "low < high")),
    Case("t_range above 1", flow_with("", "stages.texture.t_range=[0.1, 1.5]"), ("t_range", "low < high")),
    Case("t_range not a pair", flow_with("", "stages.coarse.t_range=0.5"), ("t_range",)),
    Case("--set without =", flow_with("", "seed"), ("expected KEY=VALUE",)),
    Case("--set into a value", flow_with("", "prompt.x=1"), ("prompt is a value, not a section",)),
    Case(
        "--from unknown stage",
        lambda tmp: flow()(tmp) + ["--from", "nosuch"],
        ("--from nosuch", "not an enabled stage"),
    ),
    Case(
        "disabled stage that others need",
        flow_with("stages: {coarse: {enabled: false}}\n"),
        ("needs stage(s) coarse", "enabled: true"),
    ),
    # -- priors ----------------------------------------------------------------------------
    Case("missing prior folder", flow_with("", "prior=./no/such/prior"), ("'prior'", "does not exist")),
    Case(
        "prior is a file",
        args("run", "flow.yaml", files={"flow.yaml": "prompt: a\nprior: ./p.bin\n", "p.bin": "x"}),
        ("'prior'", "is a file"),
    ),
    Case("prior folder that is no model", prior_folder(None, unet=False), ("not a diffusers model folder",)),
    Case("prior index not UTF-8", prior_folder(b"\xff\xfe\x00garbage"), ("model_index.json", "not UTF-8")),
    Case("prior index not JSON", prior_folder("{this is not json"), ("model_index.json", "not valid JSON")),
    Case(
        "prior index naming os.system",
        prior_folder('{"_class_name": "StableDiffusionPipeline", "text_encoder": ["os", "system"]}'),
        ("model_index.json", "os.system", "allowed"),
    ),
    Case(
        "prior index naming a planted module",
        prior_folder('{"_class_name": "StableDiffusionPipeline", "tokenizer": ["evil_module", "Tok"]}'),
        ("evil_module.Tok", "allowed"),
    ),
    # -- prompt files ----------------------------------------------------------------------
    Case(
        "batch: missing prompts file",
        args("batch", "nope.txt", "--flow", "flow.yaml", files={"flow.yaml": FLOW}),
        ("no such prompts file",),
    ),
    Case(
        "batch: binary prompts file",
        args(
            "batch",
            "p.txt",
            "--flow",
            "flow.yaml",
            files={"flow.yaml": FLOW, "p.txt": b"\x7fELF\x02\x01\x01\x00\x00\xff\xfe"},
        ),
        ("p.txt",),
    ),
    Case(
        "batch: only comments",
        args("batch", "p.txt", "--flow", "flow.yaml", files={"flow.yaml": FLOW, "p.txt": "# nothing\n\n"}),
        ("no prompts in the file",),
    ),
    Case(
        "batch: bad base flow",
        args("batch", "p.txt", "--flow", "flow.yaml", files={"flow.yaml": "promt: x\n", "p.txt": "a red cube\n"}),
        ("did you mean 'prompt'",),
    ),
    # -- store commands --------------------------------------------------------------------
    Case("ls: mistyped store", args("ls", "--store", "artifactz"), ("no store at artifactz",)),
    Case("gc: mistyped store", args("gc", "--store", "artifactz"), ("no store at artifactz",)),
    Case("show: mistyped store", args("show", "abc", "--store", "artifactz"), ("no store at artifactz",)),
    Case("ls: store is a file", args("ls", "--store", "afile", files={"afile": "x"}), ("is a file, not a folder",)),
    Case("ls: unknown protocol", args("ls", "--store", "foo://x"), ("'foo'",)),
    Case("show: no such artifact", args("show", "beef", "--store", "store", dirs=("store/objects",)), ("no artifact",)),
    # -- damaged artifacts -----------------------------------------------------------------
    Case("manifest entry escaping with ..", artifact_store(_escape), ("corrupt", "../../../../escaped.txt"), code=1),
    Case(
        "manifest entry with an absolute path",
        artifact_store(_absolute),
        ("corrupt", "/tmp/t3d-hostile-abs.txt"),
        code=1,
    ),
    Case("manifest emptied to files: {}", artifact_store(_emptied), ("corrupt",), code=1),
    Case("artifact file edited", artifact_store(_tampered), ("corrupt", "sha256"), code=1),
    Case(
        "gc with a corrupt run record",
        artifact_store(_corrupt_run_record, "gc"),
        ("gc stopped, nothing deleted", "broken.json"),
    ),
]


def test_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case: Case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("T3D_STAGE_REGISTRY", raising=False)
    monkeypatch.setenv("T3D_PREFECT_HOME", str(tmp_path / "prefect"))
    argv = case.setup(tmp_path)
    monkeypatch.setattr(sys, "argv", ["t3d", *argv])
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    text = out + err
    assert code == case.code, text
    assert "Traceback" not in text, text
    for word in case.words:
        assert word in text, f"{word!r} not in: {text}"
    if case.code == 2:
        assert len([line for line in text.splitlines() if line.startswith("error:")]) == 1, text
    assert not (tmp_path / "artifactz").exists(), "a mistyped --store must not create a folder"
    assert not Path("/tmp/t3d-hostile-abs.txt").exists()
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_ls_skips_a_corrupt_run_record_with_one_warning(tmp_path, monkeypatch, capsys, caplog):
    artifact_store(_corrupt_run_record, "ls")(tmp_path)
    monkeypatch.setattr(sys, "argv", ["t3d", "ls", "--store", str(tmp_path / "store")])
    with pytest.raises(SystemExit) as exc:
        main()
    out, _ = capsys.readouterr()
    assert exc.value.code == 0
    assert "1 artifacts" in out
    assert any("broken.json" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)


def test_tilde_store_means_home(tmp_path, monkeypatch):
    from t3d.flows.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "flow.yaml").write_text("prompt: a\nprior: tiny-pixel\nstore: ~/t3d-store\n")
    cfg = load_config(tmp_path / "flow.yaml")
    assert cfg.store == str(tmp_path / "home" / "t3d-store")


def test_prior_and_store_paths_are_relative_to_the_flow_file(tmp_path, monkeypatch):
    from t3d.flows.config import load_config

    (tmp_path / "proj" / "myprior").mkdir(parents=True)
    (tmp_path / "proj" / "flow.yaml").write_text("prompt: a\nprior: ./myprior\nstore: ./store\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("proj/flow.yaml")
    assert cfg.prior == str(tmp_path / "proj" / "myprior")
    assert cfg.store == str(tmp_path / "proj" / "store")
    # without `store:` the store is ./artifacts in the current folder, where `t3d ls` looks
    (tmp_path / "proj" / "bare.yaml").write_text("prompt: a\nprior: tiny-pixel\n")
    assert load_config("proj/bare.yaml").store == "./artifacts"
