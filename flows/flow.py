"""The Prefect flow: one task per enabled stage, in order, each handed its upstream keys.

No maths here: tasks call t3d.runner. Caching is the artifact store's (content keys verified by
hash), not Prefect's: Prefect's default cache policy includes the run id and its hash of tensors
is not stable across processes, so every task runs with cache_policy=NONE and returns a small
dict. A flow whose every stage is already complete is answered from the store without starting
Prefect at all (its temporary server takes 7-18 s to start).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from t3d import runner
from t3d.flows.publish import ProgressPublisher, publish_stage
from t3d.slug import slugify
from t3d.store import ArtifactStore

log = logging.getLogger("t3d")


@dataclass
class PromptRun:
    prompt: str
    run_id: str
    state: str  # completed | cached | failed
    results: list[runner.StageResult] = field(default_factory=list)
    error: str | None = None
    failed_stage: str | None = None


def run_prompt(cfg, prompt: str, registry, *, flow_file: str | None = None, force_from: str | None = None, use_prefect: bool = True, show_progress: bool = True) -> PromptRun:
    store = ArtifactStore(cfg.store)
    planned = runner.plan(cfg, prompt, registry, store, force_from)
    run_id = runner.run_id_for(cfg, prompt, flow_file)
    runner.record(store, run_id, cfg, prompt, flow_file, planned, "running")
    if not any(p.needs_run for p in planned) or not use_prefect:
        results, error, failed = _run_inline(cfg, prompt, planned, registry, store, show_progress)
        state = "failed" if error else ("cached" if all(r.state == "cached" for r in results) else "completed")
    else:
        results, error, failed = _run_prefect(cfg, prompt, planned, registry, store, run_id, show_progress)
        state = "failed" if error else "completed"
    runner.record(store, run_id, cfg, prompt, flow_file, planned, state, results, error)
    return PromptRun(prompt, run_id, state, results, error, failed)


def _run_inline(cfg, prompt, planned, registry, store, show_progress):
    results = []
    for step in planned:
        try:
            results.append(runner.execute(cfg, prompt, step, registry, store, show_progress=show_progress))
        except runner.StageFailed as exc:
            return results, str(exc), exc.stage
    return results, None, None


def _run_prefect(cfg, prompt, planned, registry, store, run_id, show_progress):
    from prefect import flow, get_run_logger, task
    from prefect.cache_policies import NONE

    slug = slugify(prompt)
    by_name = {p.name: p for p in planned}
    results: list[runner.StageResult] = []

    def stage_task(stage: str, key: str, inputs: dict[str, str]) -> dict:
        hooks = [ProgressPublisher(prompt, stage)]
        result = runner.execute(cfg, prompt, by_name[stage], registry, store, stage_log=get_run_logger(), progress_hooks=hooks, show_progress=show_progress)
        results.append(result)
        publish_stage(prompt, result)
        return {"stage": result.stage, "key": result.key, "state": result.state, "seconds": round(result.seconds, 3)}

    @flow(name="t3d", flow_run_name=f"{slug}", log_prints=True, validate_parameters=False)
    def t3d_flow(prompt: str, seed: int, stages: dict[str, str]) -> list[dict]:
        outputs = []
        for step in planned:
            run_task = task(stage_task, name=step.name, task_run_name=f"{slug}/{step.name}", cache_policy=NONE, retries=0)
            outputs.append(run_task(step.name, step.key, step.inputs))
        return outputs

    try:
        t3d_flow(prompt=prompt, seed=cfg.seed, stages={p.name: p.key for p in planned})
    except runner.StageFailed as exc:
        return results, str(exc), exc.stage
    return results, None, None
