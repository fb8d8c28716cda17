"""Plan and execute stages against the artifact store. Orchestrators (Prefect, tests) call this.

Planning needs no model and no GPU: every key follows from the config, the prior's identity and
the upstream keys, so a fully cached flow is recognised before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from t3d import __version__
from t3d.backends import BackendsParams, normalise_device
from t3d.fields.hashgrid import HashGridBackend, choose_hashgrid
from t3d.priors import DiffusionPrior, load_prior, prior_identity
from t3d.priors.compute import ComputeParams
from t3d.render.raster import RasterBackend, choose_raster
from t3d.slug import slugify
from t3d.stage import StageContext
from t3d.store import Artifact, ArtifactStore, InputCorrupt, Workspace, artifact_key, short_id

log = logging.getLogger("t3d")


class Backends:
    """The backend objects of one run on one device, as flow.yaml's `backends:` asks; a stage gets
    them as `ctx.backends`.

    Each is chosen on first use (and then cached for the process, per device), so a stage that
    never rasterizes never builds nvdiffrast.
    """

    def __init__(self, params: BackendsParams, device: torch.device | str):
        self.params = params
        self.device = normalise_device(device)

    @cached_property
    def hashgrid(self) -> HashGridBackend:
        return choose_hashgrid(self.params.hashgrid, self.device)

    @cached_property
    def raster(self) -> RasterBackend:
        return choose_raster(self.params.raster, self.device)

    def __repr__(self) -> str:
        return f"Backends(hashgrid={self.params.hashgrid!r}, raster={self.params.raster!r}, device={self.device})"


_prior_cache: dict[tuple, DiffusionPrior] = {}


def _cached_prior(loader, source: str, device: str, compute: ComputeParams | None = None):
    """One loaded prior per (source, device, compute options that shape the loaded object). A new
    set of options for the same source and device replaces the old copy rather than holding two
    models in GPU memory."""
    key = (source, device, compute.load_key() if compute is not None else None)
    if key not in _prior_cache:
        for old in [k for k in _prior_cache if k[:2] == key[:2]]:
            del _prior_cache[old]
        _prior_cache[key] = (
            loader(source, device=device) if compute is None else loader(source, device=device, compute=compute)
        )
    return _prior_cache[key]


def prior_loader(
    source: str, device: torch.device | str, compute: ComputeParams | None = None
) -> Callable[[], DiffusionPrior]:
    """What a stage context calls to get the flow's prior: loaded on first call, then shared by
    every stage of this process on the same device with the same compute: options."""
    return lambda: _cached_prior(load_prior, source, str(device), compute)


def warm_prior(cfg, planned: list[PlannedStage], registry) -> bool:
    """Load the flow's prior into this process's cache now, when a stage that will run here needs
    it (what that stage's first `ctx.load_prior()` would do). True when it loaded."""
    if not any(p.needs_run and registry[p.name].uses_prior for p in planned):
        return False
    prior_loader(cfg.prior, resolve_device(cfg.device), cfg.compute)()
    return True


class StageFailed(Exception):
    """A stage raised; `results` holds the stages of the same run that finished before it."""

    def __init__(self, stage: str, key: str, cause: BaseException, results: list[StageResult] | None = None):
        super().__init__(f"stage {stage} ({key}) failed: {type(cause).__name__}: {cause}")
        self.stage, self.key, self.cause = stage, key, cause
        self.results = list(results or [])

    def __reduce__(self):  # picklable with all its fields (Prefect may persist a failed state)
        return type(self), (self.stage, self.key, self.cause, self.results)


@dataclass
class PlannedStage:
    name: str
    key: str
    inputs: dict[str, str]
    status: str  # complete | missing | corrupt: ...
    forced: bool = False

    @property
    def needs_run(self) -> bool:
        return self.forced or self.status != "complete"


@dataclass
class StageResult:
    stage: str
    key: str
    state: str  # cached | computed | failed
    seconds: float
    path: str | None = None
    metrics: dict = field(default_factory=dict)
    error: str | None = None


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but torch sees no CUDA device (set device: auto or cpu)")
    return torch.device(requested)


@contextlib.contextmanager
def cpu_threads(device: torch.device):
    """Torch intra-op threads for a CPU stage: T3D_TORCH_THREADS=N, else 1 on machines with <= 2
    cores. There a Prefect server or a batch sibling always shares the cores, and OpenMP threads
    that spin while competing make 2 threads several times slower than 1."""
    wanted = os.environ.get("T3D_TORCH_THREADS") or ("1" if (os.cpu_count() or 1) <= 2 else None)
    if not wanted or device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(wanted)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_id_for(cfg, prompt: str, flow_file: str | None) -> str:
    """One run record per (flow file, prompt): re-running the same flow updates the same record."""
    origin = str(Path(flow_file).resolve()) if flow_file else "inline"
    digest = hashlib.sha256(f"{origin}\n{prompt}\n{cfg.seed}".encode()).hexdigest()[:8]
    return f"{cfg.name or slugify(prompt)}-{digest}"


def plan(cfg, prompt: str, registry, store: ArtifactStore, force_from: str | None = None) -> list[PlannedStage]:
    enabled = cfg.enabled_stages()
    if force_from is not None and force_from not in enabled:
        known = ", ".join(enabled) or "none"
        raise ValueError(f"--from {force_from}: not an enabled stage of this flow (enabled: {known})")
    prior = prior_identity(cfg.prior)
    keys: dict[str, str] = {}
    planned: list[PlannedStage] = []
    forcing = False
    compute_context = cfg.compute.key_context()  # only compute: options that change results (priors/compute.py)
    for name in enabled:
        stage = registry[name]
        params = getattr(cfg.stages, name)
        missing = [dep for dep in stage.inputs if dep not in keys]
        if missing:
            raise ValueError(
                f"stages.{name} needs stage(s) {', '.join(missing)}, which are disabled: enable them "
                f"(stages.{missing[0]}.enabled: true)"
            )
        inputs = {dep: keys[dep] for dep in stage.inputs}
        inputs.update({dep: keys[dep] for dep in stage.optional_inputs if dep in keys})
        context = {"camera": cfg.camera.model_dump(mode="json")}
        if stage.uses_prompt:
            context.update(prompt=prompt, negative_prompt=cfg.negative_prompt)
        if stage.uses_prior and compute_context:
            context["compute"] = compute_context
        seed = cfg.seed if stage.uses_seed else None
        key = artifact_key(name, stage.version, params.key_params(), seed, inputs, prior, context)
        keys[name] = key
        forcing = forcing or name == force_from
        planned.append(PlannedStage(name, key, inputs, store.status(key), forced=forcing))
    return planned


def execute(
    cfg,
    prompt: str,
    step: PlannedStage,
    registry,
    store: ArtifactStore,
    stage_log: logging.Logger | None = None,
    progress_hooks=None,
    show_progress: bool = True,
) -> StageResult:
    """Run one planned stage (or reuse it): one `store.compute` call claims, commits and verifies.

    Its lines go to the console (the `t3d` logger) and, when given, to `stage_log` too (the
    Prefect run log the UI shows)."""
    stage_log = _Mirror(stage_log) if stage_log is not None and stage_log is not log else log
    started = time.perf_counter()
    if not step.needs_run:
        stage_log.info("%s: cached (%s)", step.name, short_id(step.key))
        return _result(step, "cached", time.perf_counter() - started, store.get(step.key))
    stage = registry[step.name]
    params = getattr(cfg.stages, step.name)
    device = resolve_device(cfg.device)

    def run(work: Workspace) -> dict:
        if step.status.startswith("corrupt"):
            stage_log.warning("%s: existing artifact rejected (%s); recomputing", step.name, step.status)
        ctx = StageContext(
            stage=step.name,
            key=step.key,
            params=params,
            seed=cfg.seed,
            prompt=prompt,
            negative_prompt=cfg.negative_prompt,
            device=device,
            inputs=work.inputs,
            out=work.out,
            checkpoint_dir=work.checkpoints,
            backends=Backends(cfg.backends, device),
            checkpoint_sync=work.sync_checkpoint,
            recovery=cfg.recovery,
            prior_loader=prior_loader(cfg.prior, device, cfg.compute),
            camera=cfg.camera,
            log=stage_log,
            progress_hooks=list(progress_hooks or []),
            show_progress=show_progress,
        )
        stage_log.info("%s: started (%s)", step.name, short_id(step.key))
        t0 = time.perf_counter()
        with cpu_threads(device):
            # Recorded, not keyed, like the device: both change float rounding (CPU scatter-adds sum
            # in a thread-dependent order), not the maths, and keys name the maths.
            ctx.backend["torch_threads"] = torch.get_num_threads()
            stage.run(ctx)
        ctx.timings["total_s"] = round(time.perf_counter() - t0, 4)
        return {"metrics": ctx.metrics, "backend": ctx.backend, "timings": ctx.timings}

    try:
        manifest = _manifest(cfg, prompt, step, stage, params, device)
        done = store.compute(step.key, manifest, run, inputs=step.inputs, force=step.forced)
    except InputCorrupt as exc:
        cause = RuntimeError(f"upstream artifact unusable: {exc}; re-run with --from {exc.name}")
        stage_log.error("%s: failed: %s", step.name, cause)
        raise StageFailed(step.name, step.key, cause) from exc
    except Exception as exc:
        stage_log.error("%s: failed: %s: %s", step.name, type(exc).__name__, exc)
        raise StageFailed(step.name, step.key, exc) from exc
    if done.meanwhile:
        stage_log.info("%s: computed meanwhile by another run; reusing (%s)", step.name, short_id(step.key))
        return _result(step, "cached", time.perf_counter() - started, done.artifact)
    stage_log.info("%s: done in %.1f s", step.name, time.perf_counter() - started)
    return _result(step, "computed", time.perf_counter() - started, done.artifact)


def _result(step: PlannedStage, state: str, seconds: float, art: Artifact) -> StageResult:
    return StageResult(step.name, step.key, state, seconds, str(art.path), art.manifest.get("metrics", {}))


def _manifest(cfg, prompt: str, step: PlannedStage, stage, params, device: torch.device) -> dict:
    """What an artifact records about how it was made (the store adds files, hashes and the key)."""
    return {
        "stage": step.name,
        "version": stage.version,
        "params": params.key_params(),
        "seed": cfg.seed if stage.uses_seed else None,
        "prompt": prompt,
        "negative_prompt": cfg.negative_prompt,
        "inputs": step.inputs,
        "prior": {"source": cfg.prior, "identity": prior_identity(cfg.prior)},
        "camera": cfg.camera.model_dump(mode="json"),
        "device": str(device),
        "t3d_version": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


class _Mirror(logging.LoggerAdapter):
    """Console lines (the `t3d` logger) mirrored into another logger, e.g. Prefect's run log."""

    def __init__(self, other: logging.Logger | logging.LoggerAdapter):
        super().__init__(log, {})
        self.other = other

    def log(self, level, msg, *args, **kwargs) -> None:
        super().log(level, msg, *args, **kwargs)
        self.other.log(level, msg, *args, **kwargs)


@dataclass
class RunRecord:
    """A run's record in the store (runs/<run_id>.json, for `ls` and `gc`): written once when the
    run starts ("running") and once when it ends (completed, cached, failed or interrupted)."""

    store: ArtifactStore
    run_id: str
    header: dict  # prompt, flow file, seed and the planned keys

    @classmethod
    def start(
        cls, store: ArtifactStore, run_id: str, cfg, prompt: str, flow_file: str | None, planned: list[PlannedStage]
    ) -> RunRecord:
        header = {
            "prompt": prompt,
            "flow_file": str(Path(flow_file).resolve()) if flow_file else None,
            "seed": cfg.seed,
            "stages": {p.name: p.key for p in planned},
        }
        run = cls(store, run_id, header)
        run.end("running")
        return run

    def end(self, state: str, results: list[StageResult] | None = None, error: str | None = None) -> None:
        self.store.record_run(
            self.run_id, {**self.header, "state": state, "results": [asdict(r) for r in results or []], "error": error}
        )
