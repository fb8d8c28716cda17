"""The Prefect flows: one task per enabled stage, in order, each handed its upstream keys.

No maths here: tasks call t3d.runner. Caching is the artifact store's (content keys verified by
hash), not Prefect's: Prefect's default cache policy includes the run id and its hash of tensors
is not stable across processes, so every task runs with cache_policy=NONE and returns a small
dict. A flow whose every stage is already complete is answered from the store without starting
Prefect at all (starting a local server takes seconds, minutes on a busy machine).

Routing: `executor: {pool: NAME}` at the top of flow.yaml sends the whole prompt to the work
pool's deployment `t3d-prompt/NAME`; on a stage it sends just that stage to `t3d-stage/NAME`.
Workers read and write the same artifact store, which must then be a shared path or fsspec URI.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass, field

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.settings import PREFECT_API_URL, temporary_settings

from t3d import runner
from t3d.flows.publish import ProgressPublisher, publish_stage
from t3d.flows.server import PrefectConnection
from t3d.slug import slugify
from t3d.store import ArtifactStore

log = logging.getLogger("t3d")
PROMPT_FLOW, STAGE_FLOW = "t3d-prompt", "t3d-stage"
# A local `t3d run` hands its registry and result list to the flow here, not as flow parameters
# (which Prefect serializes into the API); a worker's run finds it empty.
_LOCAL: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("t3d_local_run", default=None)


@dataclass
class PromptRun:
    prompt: str
    run_id: str
    state: str  # completed | cached | failed
    results: list[runner.StageResult] = field(default_factory=list)
    error: str | None = None
    failed_stage: str | None = None


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
    store = ArtifactStore(cfg.store)
    planned = runner.plan(cfg, prompt, registry, store, force_from)
    run_id = runner.run_id_for(cfg, prompt, flow_file)
    runner.record(store, run_id, cfg, prompt, flow_file, planned, "running")
    results: list[runner.StageResult] = []
    error = failed = None
    own = prefect is None and use_prefect
    conn = PrefectConnection() if own else prefect
    try:
        api = conn.api_url() if conn is not None and use_prefect and any(p.needs_run for p in planned) else None
        if conn is not None and use_prefect and api is None and conn.problem:
            log.warning("Prefect unavailable (%s): running the stages here, not in Prefect", conn.problem)
        local = api is None
        if not local:
            try:
                with temporary_settings(updates={PREFECT_API_URL: api}):
                    if cfg.executor is not None:
                        results, error, failed = _run_on_pool(cfg, prompt, force_from, flow_file)
                    else:
                        _run_local_flow(cfg, prompt, registry, results, flow_file, force_from, show_progress)
            except runner.StageFailed as exc:
                error, failed = str(exc), exc.stage
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
        if local:
            done = {r.stage for r in results}
            for step in runner.plan(cfg, prompt, registry, store, force_from):
                if step.name in done:
                    continue
                try:
                    results.append(runner.execute(cfg, prompt, step, registry, store, show_progress=show_progress))
                except runner.StageFailed as exc:
                    error, failed = str(exc), exc.stage
                    break
    except BaseException as exc:
        state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        runner.record(store, run_id, cfg, prompt, flow_file, planned, state, results, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if own and conn is not None:
            conn.close()
    state = "failed" if error else ("cached" if results and all(r.state == "cached" for r in results) else "completed")
    runner.record(store, run_id, cfg, prompt, flow_file, planned, state, results, error)
    return PromptRun(prompt, run_id, state, results, error, failed)


def _run_local_flow(cfg, prompt, registry, results, flow_file, force_from, show_progress) -> None:
    flow_fn = t3d_prompt_flow.with_options(flow_run_name=slugify(prompt))
    token = _LOCAL.set((registry, results, show_progress))
    try:
        flow_fn(cfg.model_dump(mode="json"), prompt, flow_file, force_from)
    finally:
        _LOCAL.reset(token)


def _stage_task(
    cfg, prompt: str, step: runner.PlannedStage, registry, store: ArtifactStore, show_progress: bool
) -> runner.StageResult:
    params = getattr(cfg.stages, step.name)
    pool = params.executor.pool if params.executor else None
    if pool and step.needs_run:
        return _run_stage_on_pool(cfg, prompt, step, pool)
    result = runner.execute(
        cfg,
        prompt,
        step,
        registry,
        store,
        stage_log=get_run_logger(),
        progress_hooks=[ProgressPublisher(prompt, step.name)],
        show_progress=show_progress,
    )
    publish_stage(prompt, result)
    return result


@flow(name=PROMPT_FLOW, log_prints=True, validate_parameters=False)
def t3d_prompt_flow(
    config: dict, prompt: str, flow_file: str | None = None, force_from: str | None = None
) -> list[dict]:
    """All enabled stages for one prompt. Deployed as `t3d-prompt/<pool>` for workers."""
    from t3d.flows.config import validate
    from t3d.stages import registry_from_env

    local = _LOCAL.get()
    registry, results, show_progress = local if local is not None else (registry_from_env(), [], False)
    cfg = validate(config, registry, source="flow parameters")
    store = ArtifactStore(cfg.store)
    planned = {p.name: p for p in runner.plan(cfg, prompt, registry, store, force_from)}
    slug = slugify(prompt)

    def run_stage(stage: str, key: str, inputs: dict[str, str]) -> dict:  # small, JSON-able arguments only
        result = _stage_task(cfg, prompt, planned[stage], registry, store, show_progress)
        results.append(result)
        return {"stage": result.stage, "key": result.key, "state": result.state, "seconds": round(result.seconds, 3)}

    outputs = []
    for step in planned.values():
        stage_task = task(run_stage, name=step.name, task_run_name=f"{slug}/{step.name}", cache_policy=NONE, retries=0)
        outputs.append(stage_task(step.name, step.key, step.inputs))
    if local is None:  # a worker's run: record it, since no `t3d run` process is waiting on it
        runner.record(
            store,
            runner.run_id_for(cfg, prompt, flow_file),
            cfg,
            prompt,
            flow_file,
            list(planned.values()),
            "completed",
            results,
        )
    return outputs


@flow(name=STAGE_FLOW, log_prints=True, validate_parameters=False)
def t3d_stage_flow(config: dict, prompt: str, stage: str, force: bool = False) -> dict:
    """One stage, on whichever worker picks it up; its inputs come from the shared store."""
    from t3d.flows.config import validate
    from t3d.stages import registry_from_env

    registry = registry_from_env()
    cfg = validate(config, registry, source="flow parameters")
    store = ArtifactStore(cfg.store)
    step = next(p for p in runner.plan(cfg, prompt, registry, store) if p.name == stage)
    step.forced = force
    result = runner.execute(
        cfg,
        prompt,
        step,
        registry,
        store,
        stage_log=get_run_logger(),
        progress_hooks=[ProgressPublisher(prompt, stage)],
        show_progress=False,
    )
    publish_stage(prompt, result)
    return {"stage": result.stage, "key": result.key, "state": result.state, "seconds": round(result.seconds, 3)}


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


def _run_stage_on_pool(cfg, prompt: str, step: runner.PlannedStage, pool: str) -> runner.StageResult:
    flow_run = _wait_deployment(
        f"{STAGE_FLOW}/{pool}",
        {"config": cfg.model_dump(mode="json"), "prompt": prompt, "stage": step.name, "force": step.forced},
        f"{slugify(prompt)}/{step.name}",
    )
    store = ArtifactStore(cfg.store)
    if not flow_run.state.is_completed():
        raise runner.StageFailed(
            step.name,
            step.key,
            RuntimeError(
                f"remote run {flow_run.name} on pool {pool!r} ended {flow_run.state.name}: {flow_run.state.message}"
            ),
        )
    art = store.get(step.key)
    return runner.StageResult(
        step.name,
        step.key,
        "computed",
        float(art.manifest.get("timings", {}).get("total_s", 0.0)),
        str(art.path),
        art.manifest.get("metrics", {}),
    )


def _run_on_pool(cfg, prompt: str, force_from: str | None, flow_file: str | None):
    pool = cfg.executor.pool
    flow_run = _wait_deployment(
        f"{PROMPT_FLOW}/{pool}",
        {"config": cfg.model_dump(mode="json"), "prompt": prompt, "flow_file": flow_file, "force_from": force_from},
        slugify(prompt),
    )
    store = ArtifactStore(cfg.store)
    results = []
    from t3d.stages import registry_from_env

    for step in runner.plan(cfg, prompt, registry_from_env(), store):
        if step.status == "complete":
            art = store.get(step.key)
            results.append(
                runner.StageResult(step.name, step.key, "computed", 0.0, str(art.path), art.manifest.get("metrics", {}))
            )
    if flow_run.state.is_completed():
        return results, None, None
    return (
        results,
        f"remote run {flow_run.name} on pool {pool!r} ended {flow_run.state.name}: {flow_run.state.message}",
        None,
    )
