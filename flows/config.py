"""flow.yaml -> a validated FlowConfig, or one ConfigError naming the file, the key path and the fix."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from t3d.backends import BackendsParams
from t3d.priors.compute import ComputeParams
from t3d.render.cameras import CameraParams
from t3d.stage import ExecutorParams, RecoveryParams
from t3d.stages import PIPELINE, StageRegistry, registry_from_env


class ConfigError(Exception):
    """Bad user input (exit code 2). The message is meant to be printed as is."""


SEEDS_HINT = "give a count from 1 to 64 (e.g. seeds: 4) or a list of seeds (e.g. seeds: [0, 7, 42])"


class FlowBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    prompts: list[str] | None = None
    negative_prompt: str = ""
    seed: int = Field(0, ge=0)
    seeds: int | list[int] = Field(
        1,
        description="best-of-N: N runs (seed, seed+1, ...) or these seeds; the prior's own score picks the best",
    )
    outputs: str = Field("outputs", description="deliverables folder (relative to the flow file): <outputs>/<name>/")
    prior: str = "embedded"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    store: str = "./artifacts"
    camera: CameraParams = Field(default_factory=CameraParams)
    name: str | None = Field(None, description="run name; defaults to the prompt's slug")
    executor: ExecutorParams | None = Field(None, description="run the whole flow on this Prefect work pool")
    recovery: RecoveryParams = Field(
        default_factory=RecoveryParams, description="how a diverging stage rolls back and retries"
    )
    compute: ComputeParams = Field(
        default_factory=ComputeParams,
        description="precision, attention, VAE, offload, channels_last, compile of the prior",
    )
    backends: BackendsParams = Field(
        default_factory=BackendsParams, description="tinycudann / nvdiffrast or their torch twins (not in keys)"
    )

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _strip(cls, v: str | None) -> str | None:
        return v.strip() if isinstance(v, str) else v

    @field_validator("name")
    @classmethod
    def _slug_safe_name(cls, v: str | None) -> str | None:
        """Run names become file names (runs/<name>-<hash>.json): the same rule as export.name."""
        if v is None:
            return v
        from t3d.mesh.export import check_name
        from t3d.slug import slugify

        try:
            return check_name(v)
        except ValueError:
            raise ValueError(f"not slug-safe: use letters, digits, '.', '_', '-', e.g. {slugify(v)!r}") from None

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds_shape(cls, v):
        """One error line for a wrong type (pydantic would give one per member of the union)."""
        is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
        if not (is_int(v) or (isinstance(v, list) and all(is_int(x) for x in v))):
            raise ValueError(SEEDS_HINT)
        return v

    @field_validator("seeds")
    @classmethod
    def _seed_count_or_list(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int) and not 1 <= v <= 64:
            raise ValueError(SEEDS_HINT)
        if isinstance(v, list) and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("give distinct seeds >= 0, e.g. seeds: [0, 7, 42] (or a count, e.g. seeds: 4)")
        return v

    @field_validator("store", "prior", "outputs")
    @classmethod
    def _plain_text(cls, v: str, info: ValidationInfo) -> str:
        if "\x00" in v:
            raise ValueError("holds a NUL byte; write a plain path or name")
        if not v.strip():
            example = {"store": "./artifacts", "prior": "embedded", "outputs": "./outputs"}[info.field_name]
            raise ValueError(f"is empty: give a value, e.g. {info.field_name}: {example}")
        return v.strip()

    @model_validator(mode="after")
    def _one_prompt_source(self):
        if self.prompt is None and not self.prompts:
            raise ValueError('give `prompt: "a red cube"` (or a `prompts:` list)')
        if self.prompt is not None and self.prompts:
            raise ValueError("give either `prompt` or `prompts`, not both")
        texts = [self.prompt] if self.prompt is not None else self.prompts
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                where = "prompt" if self.prompt is not None else f"prompts[{i}]"
                raise ValueError(f'{where} is empty: write what to generate, e.g. "a red cube"')
        return self

    @model_validator(mode="after")
    def _libraries_need_cuda(self):
        for name, request in self.backends.model_dump().items():
            if request not in ("auto", "torch") and self.device == "cpu":
                raise ValueError(f"backends.{name}: {request} needs CUDA, but device is cpu; use auto or torch there")
        return self

    def seed_list(self) -> list[int]:
        """The seeds one prompt runs with: [seed] unless best-of-N asks for more."""
        return list(self.seeds) if isinstance(self.seeds, list) else [self.seed + i for i in range(self.seeds)]

    def prompt_list(self) -> list[str]:
        return [self.prompt] if self.prompt is not None else [p.strip() for p in self.prompts]

    def enabled_stages(self) -> list[str]:
        return [name for name, params in self.stages if params.enabled]  # type: ignore[attr-defined]


def config_model(registry: StageRegistry) -> type[FlowBase]:
    fields = {name: (stage.params, Field(default_factory=stage.params)) for name, stage in registry.items()}
    stages_model = create_model("StagesConfig", __config__=ConfigDict(extra="forbid"), **fields)
    stages_model.__iter__ = lambda self: iter((n, getattr(self, n)) for n in registry)  # type: ignore[method-assign]
    return create_model("FlowConfig", __base__=FlowBase, stages=(stages_model, Field(default_factory=stages_model)))


# ---- loading ------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """'stages.coarse.steps=200' -> (['stages','coarse','steps'], 200); values parse as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set stages.coarse.steps=200")
    key, _, raw = text.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text!r}: the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: {'.'.join(path[: i + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _suggest(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'? " if match else ""


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at the parent of `loc` (for did-you-mean on unknown keys)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _unwrap_optional(field.annotation)
    return list(getattr(_unwrap_optional(current), "model_fields", {}))


def _unwrap_optional(annotation: Any) -> Any:
    """`ExecutorParams | None` -> ExecutorParams, so nested keys can be listed."""
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    models = [a for a in args if hasattr(a, "model_fields")]
    return models[0] if models else annotation


# Keys an earlier flow.yaml used -> the key that replaced them, so an old flow gets the new name
# rather than a did-you-mean.
RENAMED_KEYS = {
    "stages.coarse.method": "stages.coarse.guidance",
    "stages.coarse.occupancy_threshold": "stages.coarse.occupancy_alpha (an opacity per sample, not a density)",
    **{
        f"stages.extract_mesh.geometry_{old}": f"stages.extract_mesh.geometry.{new}"
        for old, new in (
            ("steps", "steps"),
            ("resolution", "resolution"),
            ("correction_resolution", "correction_resolution"),
            ("lr", "lr"),
            ("render_size", "render_size"),
            ("batch_size", "batch_size"),
            ("guidance_scale", "guidance_scale"),
            ("t_range", "t_range"),
            ("laplacian", "lambda_laplacian"),
            ("anchor", "lambda_anchor"),
        )
    },
}


def _format_error(err: dict, model: type[BaseModel], source: str) -> str:
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden" and path in RENAMED_KEYS:
        return f"{source}: {path}: renamed to {RENAMED_KEYS[path]}"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc)
        hint = _suggest(str(loc[-1]), allowed)
        where = ".".join(str(p) for p in loc[:-1]) or "the top level"
        return f"{source}: unknown key '{path}'. {hint}Valid keys in {where}: {', '.join(allowed)}."
    if kind == "missing":
        return f"{source}: '{path}' is required."
    given = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(given, (dict, list)):
        return f"{source}: '{path}': {msg}."
    return f"{source}: '{path}': {msg} (got {given!r})."


_NEW_REQUEST = {"hashgrid": "tinycudann", "raster": "nvdiffrast"}  # what "cuda-library" asked for


def _moved_backend_keys(data: dict) -> list[str]:
    """One line per backend request still written where it lived before flow.yaml's `backends:`."""
    stages = data.get("stages")
    if not isinstance(stages, dict):
        return []
    found = []  # (old key path, new key, old value)
    for name, block in stages.items():
        if isinstance(block, dict) and "raster_backend" in block:
            found.append((f"stages.{name}.raster_backend", "raster", block["raster_backend"]))
    coarse = stages.get("coarse")
    field = coarse.get("field") if isinstance(coarse, dict) else None
    if isinstance(field, dict) and "backend" in field:
        found.append(("stages.coarse.field.backend", "hashgrid", field["backend"]))
    lines = []
    for old, new, value in found:
        value = _NEW_REQUEST[new] if value == "cuda-library" else value
        value = value if value in ("auto", "torch", _NEW_REQUEST[new]) else "auto"
        lines.append(
            f"'{old}' moved to 'backends.{new}' (one choice for the whole flow): write `backends: {{{new}: {value}}}` "
            "at the top level instead"
        )
    return lines


def validate(data: Any, registry: StageRegistry | None = None, source: str = "flow") -> FlowBase:
    registry = registry if registry is not None else registry_from_env()
    model = config_model(registry)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of keys (prompt:, seed:, stages: ...), got "
            f"{type(data).__name__}"
        )
    moved = _moved_backend_keys(data)
    if moved:
        raise ConfigError("\n".join(f"{source}: {line}" for line in moved))
    stages = data.get("stages")
    if isinstance(stages, dict):
        for name in stages:
            if name not in registry and name in dict(PIPELINE):
                raise ConfigError(
                    f"{source}: 'stages.{name}' is not available in this version of t3d (stages here: "
                    f"{', '.join(registry)}). Remove the block."
                )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(e, model, source) for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def load_config(
    path: str | Path,
    overrides: list[str] | None = None,
    registry: StageRegistry | None = None,
    prompt: str | None = None,
) -> FlowBase:
    """Read, override (--set, then `prompt`, which replaces prompt/prompts) and validate a flow file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file. Pass the path of a flow YAML, e.g. examples/sds_red_cube.yaml")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; pass a flow YAML file inside it")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read it ({exc.strerror or exc}); check the path and its permissions"
        ) from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a flow file (a flow is a few levels of keys)") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(
            f"{path}: YAML syntax error at {where}: {exc.problem}. Check indentation and quoting there."
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not readable as YAML ({exc})") from None
    if data is None:
        data = {}
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides)
    if isinstance(data, dict) and prompt is not None:
        data.pop("prompts", None)
        data["prompt"] = prompt
    cfg = validate(data, registry, source=str(path))
    # Paths written in the file are relative to the file, so flows are portable; paths given with
    # --set are relative to the current directory, like any command-line path. No `store:` at all
    # means ./artifacts in the current directory, where `t3d ls` and `t3d gc` look by default.
    overridden = {o.split("=", 1)[0].strip() for o in overrides or []}
    base = path.parent
    if isinstance(data, dict) and "store" in data and "://" not in cfg.store:
        store = Path(cfg.store).expanduser()
        cfg.store = str(
            store if store.is_absolute() else ((Path.cwd() if "store" in overridden else base) / store).resolve()
        )
    cfg.prior = _resolve_prior(cfg.prior, Path.cwd() if "prior" in overridden else base)
    check_store_uri(cfg.store, f"{path}: 'store'")
    return cfg


def _resolve_prior(prior: str, base: Path) -> str:
    """A prior written as a path (./x, ../x, ~/x, /x) or naming a folder beside the flow file is
    a folder relative to the flow file; anything else stays a name (embedded, tiny-*, hub id)."""
    if prior.startswith(("./", "../", "~", "/", ".\\")) or prior in (".", ".."):
        candidate = Path(prior).expanduser()
        return str(candidate if candidate.is_absolute() else (base / candidate).resolve())
    beside = base / prior
    if "/" in prior and beside.exists():
        return str(beside.resolve())
    return prior


def check_store_uri(uri: str, where: str, must_exist: bool = False) -> None:
    """A store the commands can use: a known fsspec protocol; a local store that is a writable
    folder (or can become one). must_exist: `ls`/`show`/`gc` never create a store by accident."""
    import os

    if "\x00" in uri:
        raise ConfigError(f"{where}: {uri!r} holds a NUL byte; give a folder or an fsspec URI")
    if "://" in uri or "::" in uri:
        import fsspec

        protocol = uri.split("::", 1)[0].split("://", 1)[0]
        try:
            fsspec.get_filesystem_class(protocol)
        except (ValueError, ImportError) as exc:
            known = "file, memory, s3 (pip install s3fs), gs (gcsfs), az (adlfs), ssh (paramiko)"
            raise ConfigError(
                f"{where}: {uri!r}: fsspec cannot open protocol {protocol!r} "
                f"({str(exc).splitlines()[0][:120]}). Use a folder or one of: {known}"
            ) from None
        if must_exist:
            fs, root = fsspec.core.url_to_fs(uri)
            if not fs.exists(root):
                raise ConfigError(
                    f"{where}: no store at {uri} (pass --store with the store your flow's `store:` names)"
                )
        return
    path = Path(uri).expanduser()
    if must_exist and not path.exists():
        raise ConfigError(
            f"{where}: no store at {uri} (pass --store with the folder your flow's `store:` names; default ./artifacts)"
        )
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(
            f"{where}: {existing} is a file, not a folder; point the store at a folder (e.g. ./artifacts)"
        )
    if not os.access(existing, os.W_OK | os.X_OK) and not must_exist:
        raise ConfigError(f"{where}: {existing} is not writable; choose a store folder you can write to")


def prompt_warnings(cfg: FlowBase, prompts: list[str]) -> list[str]:
    """One line per prompt the prior will partly ignore (the embedded prior knows a few words only)."""
    from t3d.priors.loading import resolve_source
    from t3d.priors.toy import unknown_words
    from t3d.toy.world import COLOURS, SHAPES

    try:
        kind, folder = resolve_source(cfg.prior)
    except (OSError, ValueError):  # check_environment names what is wrong with the prior
        return []
    if kind not in ("embedded", "folder") or not (Path(folder) / "t3d_prior.json").is_file():
        return []
    name = "the embedded prior" if kind == "embedded" else f"the toy prior {cfg.prior}"
    lines = []
    for prompt in prompts:
        unknown = unknown_words(prompt, folder)
        if unknown:
            words = ", ".join(repr(w) for w in unknown)
            lines.append(
                f"{prompt!r}: {name} does not know {words} and ignores it; it knows the colours "
                f"{', '.join(COLOURS)} and the shapes {', '.join(SHAPES)} (t3d prior sample shows what it draws)"
            )
    return lines


def check_environment(cfg: FlowBase, source: str) -> None:
    """What the config cannot say by itself: the device exists, a library named in `backends:` can
    run on it (checked here, not minutes later when the first stage that uses it starts), the prior
    is there."""
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{source}: 'device: cuda' but torch sees no CUDA device here; set device: auto (or cpu)")
    if cfg.device == "auto" and not torch.cuda.is_available():
        for name, request in cfg.backends.model_dump().items():
            if request not in ("auto", "torch"):
                raise ConfigError(
                    f"{source}: 'backends.{name}: {request}' needs CUDA, but torch sees no CUDA device here; "
                    "use auto or torch there"
                )
    from t3d.priors import PriorNotFoundError, prior_identity

    try:
        prior_identity(cfg.prior)
    except PriorNotFoundError as exc:
        raise ConfigError(f"{source}: 'prior': {exc}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{source}: 'prior': {cfg.prior!r} cannot be read ({exc})") from None
