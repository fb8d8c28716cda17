"""Load any supported prior behind the one DiffusionPrior interface, and name it cheaply.

Sources:
- "embedded": the toy prior shipped in priors/embedded/ (the default);
- "tiny-pixel" / "tiny-latent" (optionally "-s<seed>"): random-weight test priors;
- a local folder in diffusers layout (model_index.json + components), or
- a Hugging Face hub id, resolved through the local HF cache (no network needed once cached).

The family is detected from model_index.json (falling back to the folder's contents):
Stable Diffusion 1.x/2.x (latent, VAE, CLIP text encoder), DeepFloyd IF stage I (pixel, T5) or
the t3d toy prior (pixel, word-level tokenizer + tiny CLIP text encoder).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

import torch

from .base import DiffusionPrior
from .toy import EMBEDDED_DIR, TOY_PIPELINE_CLASS

_HOW_TO_PROVIDE = (
    "How to provide a model: (1) pass a local folder in diffusers layout (model_index.json plus "
    "unet/, text_encoder/, tokenizer/, scheduler/ and vae/ for Stable Diffusion), e.g. one made with "
    "`huggingface-cli download <id> --local-dir DIR`; (2) or put it in the Hugging Face cache "
    "(HF_HOME / HF_HUB_CACHE, default ~/.cache/huggingface/hub) on a machine with network access "
    "and copy the cache over; (3) set HF_HUB_OFFLINE=1 to use only the cache without trying the "
    "network. The default source 'embedded' needs no download."
)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".msgpack", ".onnx", ".model")
CONFIG_SUFFIXES = (".json", ".txt")
_SKIP_FILES = {
    "t3d_prior.json",
    "loss_log.json",
}  # training metadata (timings); the weights and configs define the model


class PriorNotFoundError(FileNotFoundError):
    """The requested prior is not available locally (and could not be downloaded)."""


class InvalidPriorError(PriorNotFoundError):
    """A prior folder exists but cannot be used as it is (unreadable model_index.json, a component
    class outside the allow-list). A PriorNotFoundError, so existing handlers catch it too."""


# The only (library, class) pairs a model_index.json may name, per component the loader reads.
# Classes are looked up on the transformers / diffusers packages themselves; no module named by a
# model folder is ever imported. unet / vae / scheduler are loaded with fixed classes (the
# scheduler's config is read by DDPMScheduler); their entries are checked so an unsupported folder
# fails here with a clear message instead of deep inside from_pretrained.
_TRANSFORMERS, _DIFFUSERS = "transformers", "diffusers"
ALLOWED_COMPONENT_CLASSES: dict[str, frozenset[tuple[str, str]]] = {
    "tokenizer": frozenset(
        (_TRANSFORMERS, c)
        for c in (
            "CLIPTokenizer",
            "CLIPTokenizerFast",
            "T5Tokenizer",
            "T5TokenizerFast",
            "PreTrainedTokenizerFast",
            "AutoTokenizer",
        )
    ),
    "text_encoder": frozenset(
        (_TRANSFORMERS, c) for c in ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
    ),
    "unet": frozenset({(_DIFFUSERS, "UNet2DConditionModel")}),
    "vae": frozenset({(_DIFFUSERS, "AutoencoderKL")}),
    "scheduler": frozenset(
        (_DIFFUSERS, c)
        for c in (
            "DDPMScheduler",
            "DDIMScheduler",
            "PNDMScheduler",
            "LMSDiscreteScheduler",
            "EulerDiscreteScheduler",
            "EulerAncestralDiscreteScheduler",
            "DPMSolverMultistepScheduler",
            "DPMSolverSinglestepScheduler",
            "UniPCMultistepScheduler",
            "HeunDiscreteScheduler",
            "KDPM2DiscreteScheduler",
            "KDPM2AncestralDiscreteScheduler",
            "DEISMultistepScheduler",
        )
    ),
}


def _read_json_file(path: Path) -> dict:
    """A JSON object from a prior's file; InvalidPriorError naming the file if it is not one."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InvalidPriorError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); restore the file from the model's source"
        ) from None
    except json.JSONDecodeError as e:
        raise InvalidPriorError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); restore the file from the "
            "model's source"
        ) from None
    if not isinstance(data, dict):
        raise InvalidPriorError(
            f"{path}: expected a JSON object, got {type(data).__name__}; restore the file from the model's source"
        )
    return data


# ---- source resolution -----------------------------------------------------------------------

_TINY_RE = re.compile(r"^tiny-(pixel|latent)(?:-s(\d+))?$")


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~", ".\\")) or source.count("/") > 1 or "\\" in source


def resolve_source(source: str) -> tuple[str, str]:
    """("embedded"|"tiny"|"folder"|"hub", path or id)."""
    source = str(source).strip()
    if source in ("", "embedded", "default"):
        return "embedded", str(EMBEDDED_DIR)
    if _TINY_RE.match(source):
        return "tiny", source
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PriorNotFoundError(
                f"prior source {source!r} is a file; expected a folder in diffusers layout. {_HOW_TO_PROVIDE}"
            )
        return "folder", str(path.resolve())
    if _looks_like_path(source):
        raise PriorNotFoundError(f"prior folder {source!r} does not exist. {_HOW_TO_PROVIDE}")
    return "hub", source


# ---- identity --------------------------------------------------------------------------------

_digest_lock = threading.Lock()
_digest_memo: dict[str, tuple[tuple, str]] = {}


def _model_files(folder: Path) -> list[Path]:
    files = []
    for p in sorted(folder.rglob("*")):
        if p.name in _SKIP_FILES or not p.is_file():
            continue
        if p.suffix in WEIGHT_SUFFIXES or p.suffix in CONFIG_SUFFIXES:
            files.append(p)
    return files


def _disk_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "t3d" / "prior_digests.json"


def folder_digest(folder) -> str:
    """sha256 over a model folder's weight and config files (relative path + bytes), cached by
    path, mtime and size of every file, in memory and in ~/.cache/t3d/prior_digests.json."""
    folder = Path(folder).resolve()
    files = _model_files(folder)
    signature = tuple((str(p.relative_to(folder)), p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    key = str(folder)
    with _digest_lock:
        hit = _digest_memo.get(key)
        if hit and hit[0] == signature:
            return hit[1]
    sig_json = json.dumps(signature)
    disk = _disk_cache_path()
    try:
        cached = json.loads(disk.read_text()).get(key)
        if cached and cached.get("signature") == sig_json:
            with _digest_lock:
                _digest_memo[key] = (signature, cached["digest"])
            return cached["digest"]
    except (OSError, ValueError, AttributeError):
        pass
    h = hashlib.sha256()
    for p, (rel, _, size) in zip(files, signature):
        h.update(f"{rel}\0{size}\0".encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    digest = h.hexdigest()
    with _digest_lock:
        _digest_memo[key] = (signature, digest)
    try:  # best effort: a read-only home must not break anything
        disk.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(disk.read_text())
        except (OSError, ValueError):
            data = {}
        data = {k: v for k, v in data.items() if Path(k).exists()}  # forget deleted (e.g. temporary) folders
        data[key] = {"signature": sig_json, "digest": digest}
        tmp = disk.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(disk)
    except OSError:
        pass
    return digest


def _hub_snapshot(repo_id: str) -> str | None:
    """The cached snapshot hash for a hub id, without any network access."""
    try:
        from huggingface_hub import try_to_load_from_cache

        p = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:
        return None
    if isinstance(p, str):
        return Path(p).parent.name
    return None


def prior_identity(source: str = "embedded") -> str:
    """A cheap, stable name for the weights behind `source` (goes into artifact keys; no model load).

    "embedded-toy@<12 hex>", "tiny-pixel-s0", "local-sd:<folder name>@<12 hex>",
    "hub:<id>@<snapshot hash or 'unresolved'>".
    """
    kind, where = resolve_source(source)
    if kind == "embedded":
        if not (Path(where) / "unet").is_dir():
            raise PriorNotFoundError(_embedded_missing_message())
        return f"embedded-toy@{folder_digest(where)[:12]}"
    if kind == "tiny":
        m = _TINY_RE.match(where)
        return f"tiny-{m.group(1)}-s{int(m.group(2) or 0)}"
    if kind == "folder":
        family = detect_family(Path(where))
        return f"local-{family}:{Path(where).name}@{folder_digest(where)[:12]}"
    return f"hub:{where}@{_hub_snapshot(where) or 'unresolved'}"


# ---- family detection ------------------------------------------------------------------------


def _family_from_index(index: dict) -> str | None:
    name = str(index.get("_class_name", ""))
    if name == TOY_PIPELINE_CLASS:
        return "toy"
    if "XL" in name or "StableDiffusion3" in name or "Flux" in name:
        raise ValueError(
            f"unsupported pipeline {name!r}: t3d loads Stable Diffusion 1.x/2.x, DeepFloyd IF stage I and the "
            "embedded toy prior"
        )
    if name.startswith("IF"):
        if "SuperResolution" in name:
            raise ValueError(
                f"{name!r} is a DeepFloyd IF super-resolution stage; use IF stage I (e.g. DeepFloyd/IF-I-XL-v1.0)"
            )
        return "if"
    if name.startswith("StableDiffusion"):
        return "sd"
    te = index.get("text_encoder")
    if isinstance(te, list) and len(te) == 2 and str(te[1]).startswith("T5"):
        return "if"
    if "vae" in index:
        return "sd"
    return None


def detect_family(folder: Path, index: dict | None = None) -> str:
    """'toy', 'sd' or 'if' for a diffusers-layout folder."""
    folder = Path(folder)
    if index is None and (folder / "model_index.json").is_file():
        index = _read_json_file(folder / "model_index.json")
        check_model_index(index, str(folder / "model_index.json"))
    if index:
        fam = _family_from_index(index)
        if fam:
            return fam
    if (folder / "t3d_prior.json").is_file():
        return "toy"
    if (folder / "vae").is_dir():
        return "sd"
    cfg = folder / "text_encoder" / "config.json"
    if cfg.is_file() and _read_json_file(cfg).get("model_type") == "t5":
        return "if"
    if (folder / "unet").is_dir():
        return "if" if not (folder / "vae").is_dir() else "sd"
    raise PriorNotFoundError(
        f"{folder} is not a diffusers model folder (no model_index.json, unet/ or vae/). {_HOW_TO_PROVIDE}"
    )


# ---- loading ---------------------------------------------------------------------------------


def _embedded_missing_message() -> str:
    return (
        f"the embedded toy prior's weights are missing from {EMBEDDED_DIR} (a source checkout before "
        "training?). Rebuild them with `t3d prior train --out priors/embedded` (or "
        "t3d.priors.train.train_toy_prior), or pass another prior source."
    )


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def _tf_dtype_kwargs(dtype) -> dict:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def _index_entry(index: dict, name: str, where: str) -> tuple[str, str] | None:
    """model_index.json's (library, class) for component `name`, checked against the allow-list;
    None when absent or null. `where` names the file in errors."""
    entry = index.get(name)
    if entry is None or (isinstance(entry, list) and len(entry) == 2 and entry[0] is None and entry[1] is None):
        return None
    if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) and x for x in entry)):
        raise InvalidPriorError(
            f'{where}: "{name}" must be ["<library>", "<class>"], got {json.dumps(entry)[:80]}; '
            "fix the file or use a supported prior"
        )
    lib, cls = entry
    allowed = ALLOWED_COMPONENT_CLASSES[name]
    if (lib, cls) not in allowed:
        choices = ", ".join(f"{a}.{b}" for a, b in sorted(allowed))
        raise InvalidPriorError(
            f'{where}: "{name}" names {lib}.{cls}, which t3d does not load (allowed: {choices}); '
            "fix the entry or use a supported prior (Stable Diffusion 1.x/2.x, DeepFloyd IF stage I, the "
            "embedded toy prior)"
        )
    return lib, cls


def check_model_index(index: dict, where: str) -> None:
    """Every component entry the loader reads is on the allow-list (InvalidPriorError otherwise)."""
    for name in ALLOWED_COMPONENT_CLASSES:
        _index_entry(index, name, where)


def _class_from_index(index: dict, name: str, default_lib: str, default_cls: str, where: str = "model_index.json"):
    """The allow-listed class model_index.json names for `name` (the default when it names none).

    Only getattr on the transformers / diffusers package: never an import of a module the file names.
    """
    lib, cls = _index_entry(index, name, where) or (default_lib, default_cls)
    if (lib, cls) not in ALLOWED_COMPONENT_CLASSES[name]:
        raise InvalidPriorError(f"{where}: default class {lib}.{cls} for {name!r} is not on the allow-list")
    if lib == _TRANSFORMERS:
        import transformers as package
    else:
        import diffusers as package
    try:
        return getattr(package, cls)
    except AttributeError:
        raise InvalidPriorError(
            f'{where}: "{name}" names {lib}.{cls}, which this {lib} version does not have; '
            f"upgrade {lib} or change the entry"
        ) from None


def _has_variant(root: str, subfolder: str, variant: str) -> bool:
    d = Path(root) / subfolder
    return d.is_dir() and any(f".{variant}." in p.name for p in d.iterdir())


def _load_components(
    root: str,
    family: str,
    index: dict,
    dtype: torch.dtype,
    local_files_only: bool,
    is_hub: bool,
    where: str = "model_index.json",
) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    hub_kw = {"local_files_only": local_files_only} if is_hub else {}

    def diffusers_model(cls, sub):
        variants = ["fp16", None] if dtype == torch.float16 else [None]
        if not is_hub:
            variants = [v for v in variants if v is None or _has_variant(root, sub, v)]
        last = None
        for v in variants:
            try:
                kw = {"variant": v} if v else {}
                return cls.from_pretrained(root, subfolder=sub, torch_dtype=dtype, **kw, **hub_kw)
            except (OSError, ValueError) as e:
                last = e
        raise last

    default_tok = {"toy": "PreTrainedTokenizerFast", "sd": "CLIPTokenizer", "if": "T5Tokenizer"}[family]
    default_te = {"toy": "CLIPTextModel", "sd": "CLIPTextModel", "if": "T5EncoderModel"}[family]
    check_model_index(index, where)
    tok_cls = _class_from_index(index, "tokenizer", "transformers", default_tok, where)
    te_cls = _class_from_index(index, "text_encoder", "transformers", default_te, where)
    comps = {
        "tokenizer": tok_cls.from_pretrained(root, subfolder="tokenizer", **hub_kw),
        "text_encoder": te_cls.from_pretrained(root, subfolder="text_encoder", **_tf_dtype_kwargs(dtype), **hub_kw),
        "unet": diffusers_model(UNet2DConditionModel, "unet"),
        "scheduler": DDPMScheduler.from_pretrained(root, subfolder="scheduler", **hub_kw),
    }
    if family == "sd":
        comps["vae"] = diffusers_model(AutoencoderKL, "vae")
    return comps


def _read_hub_index(repo_id: str) -> tuple[dict, bool]:
    """model_index.json of a hub repo: (index, local_files_only). The local cache comes first (it
    is also what prior_identity names), then the hub unless HF_HUB_OFFLINE is set; raises
    PriorNotFoundError with instructions when neither works."""
    from huggingface_hub import hf_hub_download

    offline = _is_offline()
    attempts = [True] if offline else [True, False]
    errors = []
    for local_only in attempts:
        try:
            path = hf_hub_download(repo_id, "model_index.json", local_files_only=local_only)
        except Exception as e:  # network errors, missing repo, missing cache entry, bad id
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        return _read_json_file(Path(path)), local_only
    where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the hub or in the local cache"
    raise PriorNotFoundError(f"could not find prior {repo_id!r} {where}: {'; '.join(errors)}. {_HOW_TO_PROVIDE}")


def _image_size(family: str, comps: dict, meta: dict) -> int:
    unet_size = comps["unet"].config.sample_size
    unet_size = unet_size[0] if isinstance(unet_size, (list, tuple)) else int(unet_size)
    if family == "sd":
        vae = comps["vae"]
        return unet_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return int(meta.get("image_size", unet_size))


def load_prior(
    source: str = "embedded", device="cpu", dtype: torch.dtype | None = None, compute=None
) -> DiffusionPrior:
    """Load a prior (see module doc for sources). fp16 on CUDA by default, fp32 on CPU (the tiny
    test priors: fp32 everywhere). `compute` (priors/compute.py ComputeParams, flow.yaml
    `compute:`) sets the precision unless `dtype` is given, and the memory and speed options."""
    from .compute import apply_compute

    device = torch.device(device)
    if dtype is None and compute is not None:
        dtype = compute.torch_dtype()
    return apply_compute(_load(source, device, dtype), compute)


def _load(source: str, device: torch.device, dtype: torch.dtype | None) -> DiffusionPrior:
    kind, where = resolve_source(source)
    if kind == "tiny":
        from .tiny import build_tiny_prior

        m = _TINY_RE.match(where)
        prior = build_tiny_prior(m.group(1), seed=int(m.group(2) or 0))
        dtype = dtype or torch.float32
        for name in ("text_encoder", "unet", "vae"):
            mod = getattr(prior, name)
            if mod is not None:
                mod.to(device, dtype)
        prior.device, prior.dtype = device, dtype
        return prior
    dtype = dtype or _default_dtype(device)
    meta: dict = {}
    if kind in ("embedded", "folder"):
        folder = Path(where)
        if kind == "embedded" and not (folder / "unet").is_dir():
            raise PriorNotFoundError(_embedded_missing_message())
        index_path = folder / "model_index.json"
        index = _read_json_file(index_path) if index_path.is_file() else {}
        check_model_index(index, str(index_path))
        family = detect_family(folder, index)
        if (folder / "t3d_prior.json").is_file():
            meta = _read_json_file(folder / "t3d_prior.json")
        try:
            comps = _load_components(
                str(folder), family, index, dtype, local_files_only=True, is_hub=False, where=str(index_path)
            )
        except InvalidPriorError:
            raise
        except (OSError, ValueError) as e:
            raise PriorNotFoundError(f"could not load the {family} prior from {folder}: {e}. {_HOW_TO_PROVIDE}") from e
    else:
        index, local_only = _read_hub_index(where)
        check_model_index(index, f"{where}/model_index.json")
        family = _family_from_index(index)
        if family is None:
            raise PriorNotFoundError(
                f"{where!r}: cannot tell the model family from its model_index.json ({index.get('_class_name')!r})"
            )
        try:
            comps = _load_components(
                where, family, index, dtype, local_files_only=local_only, is_hub=True, where=f"{where}/model_index.json"
            )
        except InvalidPriorError:
            raise
        except (OSError, ValueError) as e:
            raise PriorNotFoundError(f"could not load all components of {where!r}: {e}. {_HOW_TO_PROVIDE}") from e
    for name in ("text_encoder", "unet", "vae"):
        if name in comps:
            comps[name].to(device).eval().requires_grad_(False)
    space = "latent" if family == "sd" else "pixel"
    extra = {"family": family, "source": str(source)}
    if family == "if":
        extra["text_attention_mask"] = True  # IF's pipeline masks T5 padding
    if meta:
        extra["meta"] = meta
    return DiffusionPrior(
        identity=prior_identity(source),
        space=space,
        image_size=_image_size(family, comps, meta),
        tokenizer=comps["tokenizer"],
        text_encoder=comps["text_encoder"],
        unet=comps["unet"],
        scheduler=comps["scheduler"],
        vae=comps.get("vae"),
        device=device,
        dtype=dtype,
        default_guidance_scale=float(meta.get("guidance_scale", 7.0 if family == "if" else 7.5)),
        extra=extra,
    )
