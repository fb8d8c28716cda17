"""Work pools, deployments and workers: how a flow or a stage reaches a GPU machine.

`t3d deploy --pool gpu` registers two deployments on a process work pool: `t3d-prompt/gpu`
(a whole prompt) and `t3d-stage/gpu` (one stage). Their entrypoints are module paths inside the
installed package, so a worker needs only `pip install t3d` and access to the shared store.
"""

from __future__ import annotations

import os
import sys

from t3d.flows.flow import PROMPT_FLOW, STAGE_FLOW, t3d_prompt_flow, t3d_stage_flow


def ensure_pool(name: str, kind: str = "process") -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=kind))


def deploy(pool: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """Create or update both deployments on `pool`; returns {deployment name: id}."""
    from prefect.types.entrypoint import EntrypointType

    ensure_pool(pool)
    ids = {}
    for fl, name in ((t3d_prompt_flow, PROMPT_FLOW), (t3d_stage_flow, STAGE_FLOW)):
        dep_id = fl.deploy(
            name=pool,
            work_pool_name=pool,
            build=False,
            push=False,
            entrypoint_type=EntrypointType.MODULE_PATH,
            job_variables={"env": env} if env else None,
            print_next_steps=False,
            ignore_warnings=True,
            enforce_parameter_schema=False,
        )
        ids[f"{name}/{pool}"] = str(dep_id)
    return ids


def worker_command(pool: str, limit: int | None = None, name: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
    if limit:
        cmd += ["--limit", str(limit)]
    if name:
        cmd += ["--name", name]
    return cmd


def start_worker(pool: str, limit: int | None = None, name: str | None = None) -> None:
    """Replace this process with a Prefect process worker polling `pool` (signals go straight to it)."""
    ensure_pool(pool)
    cmd = worker_command(pool, limit, name)
    os.execv(cmd[0], cmd)
