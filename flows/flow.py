"""The Prefect flows: one `run_stage` task per enabled stage, in order, each handed its planned key.

No maths here: tasks call t3d.runner. Caching is the artifact store's (content keys verified by
hash), not Prefect's: Prefect's default cache policy includes the run id and its hash of tensors
is not stable across processes, so the task runs with cache_policy=NONE. Flows and tasks take
and return small JSON-able values only (the config as a dict, the stage registry as its
"module:attr" spec), so a local `t3d run` and a worker run the same code the same way; a local
run gets its results from the flow's return value (or, on failure, from the StageFailed it
raises). A flow whose every stage is already complete is answered from the store without
starting Prefect at all (starting a local server takes seconds, minutes on a busy machine).

Routing: `executor: {pool: NAME}` at the top of flow.yaml sends the whole prompt to the work
pool's deployment `t3d-prompt/NAME`; on a stage it sends just that stage to `t3d-stage/NAME`.
Workers read and write the same artifact store, which must then be a shared path or fsspec URI.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.settings import PREFECT_API_URL, temporary_settings

from t3d import runner
from t3d.flows.publish import ProgressPublisher, publish_stage
from t3d.flows.server import PrefectConnection
from t3d.slug import slugify
from t3d.store import ArtifactCorrupt, ArtifactStore

log = logging.getLogger("t3d")
PROMPT_FLOW, STAGE_FLOW = "t3d-prompt", "t3d-stage"


@dataclass
class PromptRun:
    prompt: str
    run_id: str
    state: str  # completed | cached | failed
    results: list[runner.StageResult] = field(default_factory=list)
    error: str | None = None
    failed_stage: str | None = None
    seed: int | None = None


def run_prompt(
    cfg,
    prompt: str,
    registry,
    *,
    flow_file: str | None = None,
    force_from: str | None = None,
    use_prefect: bool = True,
    show_progress: bool = True,
    prefect: PrefectConnection | None = None,
) -> PromptRun:
    """Run (or resume) every enabled stage for one prompt; records the run in the store.

    Prefect is a view, not a dependency: when it cannot be reached (or fails mid-run) the
    remaining stages run here, with the same store and keys, after a one-line warning. A run
    that is interrupted or crashes is recorded as such, never left "running".
    """
    spec = registry_spec(registry) if use_prefect else None
    store = ArtifactStore(cfg.store)
    planned = runner.plan(cfg, prompt, registry, store, force_from)
    run = runner.RunRecord.start(store, runner.run_id_for(cfg, prompt, flow_file), cfg, prompt, flow_file, planned)
    results: list[runner.StageResult] = []
    error = failed = None
    own = prefect is None and use_prefect
    conn = PrefectConnection() if own else prefect
    try:
        needs_api = conn is not None and use_prefect and any(p.needs_run for p in planned)
        api = _connect_while_loading_prior(conn, cfg, planned, registry) if needs_api else None
        if conn is not None and use_prefect and api is None and conn.problem:
            log.warning("Prefect unavailable (%s): running the stages here, not in Prefect", conn.problem)
        local = api is None
        if not local:
            try:
                with temporary_settings(updates={PREFECT_API_URL: api}):
                    if cfg.executor is not None:
                        results, error, failed = _run_on_pool(
                            cfg, prompt, spec, planned, run.run_id, force_from, flow_file
                        )
                    else:
                        results = _run_local_flow(cfg, prompt, spec, force_from, show_progress)
            except runner.StageFailed as exc:
                results, error, failed = exc.results, str(exc), exc.stage
            except Exception as exc:
                if cfg.executor is not None:
                    error = (
                        f"the work pool {cfg.executor.pool!r} could not be reached through Prefect "
                        f"({type(exc).__name__}: {exc})"
                    )
                else:
                    log.warning(
                        "Prefect failed mid-run (%s: %s): finishing the stages here", type(exc).__name__, str(exc)[:200]
                    )
                    local = True
        if local:  # re-planned only after a Prefect attempt, which may have committed stages
            steps = planned if api is None else runner.plan(cfg, prompt, registry, store, force_from)
            results, error, failed = _run_here(cfg, prompt, steps, registry, store, show_progress, results)
    except BaseException as exc:
        run.end(
            "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", results, f"{type(exc).__name__}: {exc}"
        )
        raise
    finally:
        if own and conn is not None:
            conn.close()
    state = _final_state(results, error)
    run.end(state, results, error)
    return PromptRun(prompt, run.run_id, state, results, error, failed, cfg.seed)


def _connect_while_loading_prior(conn: PrefectConnection, cfg, planned, registry) -> str | None:
    """conn.api_url(), with the flow's prior loaded meanwhile when the stages will run in this process.

    A first run starts Prefect's server (8 s on an existing data folder, 17 s on a fresh one, on a
    busy 2-core machine) and then imports diffusers and loads the prior (4-8 s): a separate
    process and this one, so on two cores the two waits overlap. A prior that fails to load is
    left to the stage that needs it, which reports it as that stage's failure."""
    if cfg.executor is not None or conn.connected_url is not None:
        return conn.api_url()
    outcome: dict = {}

    def connect() -> None:
        try:
            outcome["api"] = conn.api_url()
        except BaseException as exc:  # re-raised below, in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=connect, name="t3d-prefect-connect", daemon=True)
    thread.start()
    try:
        runner.warm_prior(cfg, planned, registry)
    except Exception as exc:
        log.debug("loading the prior early failed (%s); the stage will load it", exc)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("api")


def registry_spec(registry) -> str:
    """The "module:attr" a flow loads `registry` from (flows take JSON-able parameters only)."""
    spec = getattr(registry, "spec", None)
    if not spec:
        raise ValueError(
            "this stage registry has no spec a Prefect flow can load it from: build it with "
            "t3d.stages.registry_from_spec('module:attr'), or run with use_prefect=False"
        )
    return spec


def _final_state(results: list[runner.StageResult], error: str | None) -> str:
    if error:
        return "failed"
    return "cached" if results and all(r.state == "cached" for r in results) else "completed"


def _run_here(cfg, prompt, steps, registry, store, show_progress, results):
    """The steps not in `results` yet, in this process, without Prefect: (results, error, failed stage)."""
    results = list(results)
    done = {r.stage for r in results}
    for step in steps:
        if step.name in done:
            continue
        try:
            results.append(runner.execute(cfg, prompt, step, registry, store, show_progress=show_progress))
        except runner.StageFailed as exc:
            return results, str(exc), exc.stage
    return results, None, None


def _run_local_flow(cfg, prompt: str, spec: str, force_from: str | None, show_progress: bool):
    """The prompt flow in this process; its return value (or StageFailed.results) is the stages' results."""
    flow_fn = t3d_prompt_flow.with_options(flow_run_name=slugify(prompt))
    outcomes = flow_fn(
        cfg.model_dump(mode="json"),
        prompt,
        force_from=force_from,
        registry=spec,
        show_progress=show_progress,
        record=False,
    )
    return [runner.StageResult(**o) for o in outcomes]


def _load(config: dict, registry: str | None):
    """(registry, validated config) inside a flow or task: the same on a worker and locally."""
    from t3d.flows.config import validate
    from t3d.stages import registry_from_env, registry_from_spec

    reg = registry_from_spec(registry) if registry else registry_from_env()
    return reg, validate(config, reg, source="flow parameters")


def _stage_run_name() -> str:
    from prefect.runtime import task_run

    params = task_run.parameters
    return f"{slugify(params['prompt'])}/{params['step'].name}"


@task(name="stage", task_run_name=_stage_run_name, cache_policy=NONE, retries=0)
def run_stage(
    config: dict, prompt: str, step: runner.PlannedStage, registry: str | None = None, show_progress: bool = False
) -> dict:
    """One planned stage: computed here, sent to its stage's work pool, or reused from the store.
    Returns the StageResult as a dict; raises StageFailed."""
    reg, cfg = _load(config, registry)
    params = getattr(cfg.stages, step.name)
    pool = params.executor.pool if params.executor else None
    if pool and step.needs_run:
        result = _run_stage_on_pool(cfg, prompt, step, pool, registry)
    else:
        result = runner.execute(
            cfg,
            prompt,
            step,
            reg,
            ArtifactStore(cfg.store),
            stage_log=get_run_logger(),
            progress_hooks=[ProgressPublisher(prompt, step.name)],
            show_progress=show_progress,
        )
        publish_stage(prompt, result)
    return asdict(result)


@flow(name=PROMPT_FLOW, log_prints=True, validate_parameters=False)
def t3d_prompt_flow(
    config: dict,
    prompt: str,
    flow_file: str | None = None,
    force_from: str | None = None,
    registry: str | None = None,
    run_id: str | None = None,
    show_progress: bool = False,
    record: bool = True,
) -> list[dict]:
    """All enabled stages for one prompt, one `run_stage` task each. Deployed as `t3d-prompt/<pool>`.

    registry: the stage registry's spec (default: T3D_STAGE_REGISTRY, else t3d's stages). A worker's
    run records itself in the store under `run_id` (record=True); a local `t3d run` records its own.
    """
    reg, cfg = _load(config, registry)
    store = ArtifactStore(cfg.store)
    planned = runner.plan(cfg, prompt, reg, store, force_from)
    run = None
    if record:
        run_id = run_id or runner.run_id_for(cfg, prompt, flow_file)
        run = runner.RunRecord.start(store, run_id, cfg, prompt, flow_file, planned)
    outcomes: list[dict] = []
    try:
        for step in planned:
            outcomes.append(run_stage(config, prompt, step, registry, show_progress))
    except runner.StageFailed as exc:
        done = [runner.StageResult(**o) for o in outcomes]
        if run is not None:
            run.end("failed", done, str(exc))
        raise runner.StageFailed(exc.stage, exc.key, exc.cause, done) from exc
    except BaseException as exc:
        if run is not None:
            state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            run.end(state, [runner.StageResult(**o) for o in outcomes], f"{type(exc).__name__}: {exc}")
        raise
    if run is not None:
        results = [runner.StageResult(**o) for o in outcomes]
        run.end(_final_state(results, None), results)
    return outcomes


@flow(name=STAGE_FLOW, log_prints=True, validate_parameters=False)
def t3d_stage_flow(config: dict, prompt: str, stage: str, force: bool = False, registry: str | None = None) -> dict:
    """One stage, on whichever worker picks it up; its inputs come from the shared store."""
    reg, cfg = _load(config, registry)
    store = ArtifactStore(cfg.store)
    step = next(p for p in runner.plan(cfg, prompt, reg, store) if p.name == stage)
    step.forced = force
    result = runner.execute(
        cfg,
        prompt,
        step,
        reg,
        store,
        stage_log=get_run_logger(),
        progress_hooks=[ProgressPublisher(prompt, stage)],
        show_progress=False,
    )
    publish_stage(prompt, result)
    return asdict(result)


def _wait_deployment(name: str, parameters: dict, run_name: str):
    """Submit to a work pool and wait. The idempotency key makes a client-side retry of the
    create request (a slow server under load) return the same run instead of a duplicate."""
    import uuid

    from prefect.deployments import run_deployment

    return run_deployment(
        name,
        parameters=parameters,
        flow_run_name=run_name,
        timeout=None,
        poll_interval=1,
        idempotency_key=uuid.uuid4().hex,
    )


def _remote_error(flow_run, pool: str) -> str:
    return f"remote run {flow_run.name} on pool {pool!r} ended {flow_run.state.name}: {flow_run.state.message}"


def _results_from_store(store: ArtifactStore, planned: list[runner.PlannedStage]):
    """What a remote run did, read back from the manifests it committed: (results, first stage
    without a usable artifact). A stage that needed a run is "computed", with the seconds its
    manifest's timings record; one that did not is "cached"."""
    results = []
    for step in planned:
        try:
            art = store.get(step.key)
        except ArtifactCorrupt:
            return results, step.name
        seconds = float(art.manifest.get("timings", {}).get("total_s", 0.0)) if step.needs_run else 0.0
        state = "computed" if step.needs_run else "cached"
        results.append(
            runner.StageResult(step.name, step.key, state, seconds, str(art.path), art.manifest.get("metrics", {}))
        )
    return results, None


def _run_stage_on_pool(cfg, prompt: str, step: runner.PlannedStage, pool: str, spec: str | None):
    flow_run = _wait_deployment(
        f"{STAGE_FLOW}/{pool}",
        {
            "config": cfg.model_dump(mode="json"),
            "prompt": prompt,
            "stage": step.name,
            "force": step.forced,
            "registry": spec,
        },
        f"{slugify(prompt)}/{step.name}",
    )
    results, missing = _results_from_store(ArtifactStore(cfg.store), [step])
    if not flow_run.state.is_completed() or missing:
        raise runner.StageFailed(step.name, step.key, RuntimeError(_remote_error(flow_run, pool)))
    return results[0]


def _run_on_pool(cfg, prompt: str, spec: str | None, planned, run_id: str, force_from, flow_file):
    """The whole prompt on the work pool: (results, error, failed stage), read back from the store."""
    pool = cfg.executor.pool
    flow_run = _wait_deployment(
        f"{PROMPT_FLOW}/{pool}",
        {
            "config": cfg.model_dump(mode="json"),
            "prompt": prompt,
            "flow_file": flow_file,
            "force_from": force_from,
            "registry": spec,
            "run_id": run_id,
        },
        slugify(prompt),
    )
    results, missing = _results_from_store(ArtifactStore(cfg.store), planned)
    if flow_run.state.is_completed() and missing is None:
        return results, None, None
    return results, _remote_error(flow_run, pool), missing
