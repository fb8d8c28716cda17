"""The `t3d` command. Thin: parse arguments, call flows/ and the store, print, pick the exit code.

Exit codes: 0 ok, 1 a stage failed, 2 bad input.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="t3d: text to textured 3D asset by score distillation, in cached, resumable stages.", no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False)
console = Console(stderr=True)
out = Console()

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=logging.INFO if not verbose else logging.DEBUG, handlers=[handler], format="%(message)s", force=True)


def _fail_input(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


@app.command()
def run(
    flow_file: Path = typer.Argument(..., help="flow YAML, e.g. examples/sds_red_cube.yaml"),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set stages.coarse.steps=200 (repeatable)"),
    from_stage: Optional[str] = typer.Option(None, "--from", help="force this stage and every later one to re-run"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="run this prompt instead of the file's prompt(s)"),
    no_prefect: bool = typer.Option(False, "--no-prefect", help="run the stages in-process without Prefect"),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Run a flow: finished stages are reused (cached), the first missing one continues."""
    from t3d.flows.config import ConfigError, load_config
    from t3d.flows.flow import run_prompt
    from t3d.stages import registry_from_env

    _setup_logging(verbose)
    registry = registry_from_env()
    try:
        cfg = load_config(flow_file, set_, registry, prompt=prompt)
    except ConfigError as exc:
        _fail_input(str(exc))
    failed = False
    for prompt in cfg.prompt_list():
        try:
            result = run_prompt(cfg, prompt, registry, flow_file=str(flow_file), force_from=from_stage, use_prefect=not no_prefect)
        except ValueError as exc:  # planning errors: bad --from, disabled dependencies
            _fail_input(f"{flow_file}: {exc}")
        _print_run(result)
        failed = failed or result.state == "failed"
    raise typer.Exit(EXIT_FAILED if failed else EXIT_OK)


def _print_run(result) -> None:
    table = Table(title=f"{result.prompt!r}  [{result.state}]", title_justify="left")
    for col in ("stage", "state", "seconds", "key", "quality"):
        table.add_column(col, overflow="fold")
    for r in result.results:
        style = {"cached": "cyan", "computed": "green"}.get(r.state, "red")
        quality = " ".join(f"{k}={r.metrics[k]:.3f}" for k in ("iou", "color_err") if isinstance(r.metrics.get(k), (int, float)))
        table.add_row(r.stage, f"[{style}]{r.state}[/]", f"{r.seconds:.1f}", r.key, quality)
    if result.error:
        table.add_row(result.failed_stage or "?", "[red]failed[/]", "", "", "")
    out.print(table)
    if result.results:
        last = result.results[-1]
        out.print(f"{last.stage} output: {_headline_file(last.path)}", soft_wrap=True, highlight=False)
    if result.error:
        console.print(f"[red]{result.error}[/]\nFix the cause and run the same command again: finished stages are reused.", highlight=False, soft_wrap=True)


def _headline_file(path: str | None) -> str:
    """The file a person wants from a stage folder: the GLB, else a preview, else the folder."""
    if not path:
        return ""
    folder = Path(path)
    for pattern in ("*.glb", "turntable.gif", "*.png"):
        found = sorted(folder.glob(pattern))
        if found:
            return str(found[0])
    return str(folder)


@app.command()
def batch(
    prompts_file: Path = typer.Argument(..., help="text file: one prompt per line, '#' comments"),
    flow: Path = typer.Option(..., "--flow", help="base flow YAML; each prompt replaces its prompt"),
    concurrency: int = typer.Option(1, "--concurrency", "-j", min=1, help="prompts run at once"),
    set_: list[str] = typer.Option([], "--set", help="override a key for every prompt"),
    summary: Optional[Path] = typer.Option(None, help="summary path without suffix (writes .csv and .json); default batch-<file>"),
    data: Path = typer.Option(Path.home() / ".cache" / "t3d" / "prefect", help="Prefect data folder when t3d starts the server itself"),
) -> None:
    """Generate every prompt of a list: one flow run each; a failing prompt does not stop the others."""
    import os

    from t3d.flows.batch import read_prompts, run_batch, write_summary
    from t3d.flows.config import ConfigError, load_config
    from t3d.flows.publish import publish_table
    from t3d.flows.server import server_env, start_server

    try:
        prompts = read_prompts(prompts_file)
        load_config(flow, set_, prompt=prompts[0])
    except ConfigError as exc:
        _fail_input(str(exc))
    server = None
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        console.print(f"starting a Prefect server for this batch (data in {data}) ...")
        server = start_server(data)
        api = server.api_url
        console.print(f"Prefect UI: {server.ui_url}")
    env = server_env(data, api) if server else {**os.environ}
    env.setdefault("TQDM_DISABLE", "1")
    os.environ["PREFECT_API_URL"] = api
    done = []

    def report(row) -> None:
        done.append(row)
        colour = {"failed": "red", "cached": "cyan"}.get(row.state, "green")
        console.print(f"[{len(done)}/{len(prompts)}] [{colour}]{row.state}[/] {row.prompt!r} ({row.seconds:.1f}s)", highlight=False)

    try:
        rows = run_batch(flow, prompts, concurrency, set_, env=env, on_done=report)
        base = summary or Path(f"batch-{prompts_file.stem}")
        json_path, csv_path = write_summary(rows, base)
        publish_table([{"prompt": r.prompt, "state": r.state, "seconds": r.seconds, "glb": r.glb, "error": r.error} for r in rows], f"batch-{prompts_file.stem}", f"batch {prompts_file.name}")
    finally:
        if server:
            server.stop()
    table = Table(title=f"batch {prompts_file} ({concurrency} at a time)", title_justify="left")
    for col in ("prompt", "state", "seconds", "glb", "quality", "error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        quality = ", ".join(f"{k}={v:.3g}" for k, v in r.metrics.items() if any(m in k for m in ("iou", "color_err")))
        table.add_row(r.prompt, r.state, f"{r.seconds:.1f}", r.glb, quality, r.error)
    out.print(table)
    out.print(f"summary: {csv_path} and {json_path}")
    raise typer.Exit(EXIT_FAILED if any(r.state == "failed" for r in rows) else EXIT_OK)


@app.command()
def server(
    host: str = typer.Option("127.0.0.1", help="address to bind (keep 127.0.0.1 unless you mean to expose it)"),
    port: int = typer.Option(4200),
    data: Path = typer.Option(Path.home() / ".cache" / "t3d" / "prefect", help="Prefect database and settings folder"),
) -> None:
    """Start Prefect's server and UI; runs report to it once PREFECT_API_URL points at it."""
    import time

    from t3d.flows.server import start_server

    srv = start_server(data, host=host, port=port)
    out.print(f"Prefect UI:  {srv.ui_url}\nAPI:         {srv.api_url}\ndata:        {srv.data_dir}\nlog:         {srv.log_path}")
    out.print(f"In another shell:  export PREFECT_API_URL={srv.api_url}   then t3d run / t3d batch report here. Ctrl-C stops.")
    try:
        while srv.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()


@app.command()
def deploy(pool: str = typer.Option(..., "--pool", help="Prefect work pool (created as a process pool if missing)")) -> None:
    """Register the t3d-prompt and t3d-stage deployments on a work pool (needs PREFECT_API_URL)."""
    import os

    from t3d.flows.deploy import deploy as do_deploy

    if not os.environ.get("PREFECT_API_URL"):
        _fail_input("PREFECT_API_URL is not set: start `t3d server` (or point at your Prefect server) first")
    for name, dep_id in do_deploy(pool).items():
        out.print(f"deployment {name}  ({dep_id})")
    out.print(f"Route a flow with `executor: {{pool: {pool}}}` (whole flow) or on one stage; start workers with `t3d worker --pool {pool}`.")


@app.command()
def worker(
    pool: str = typer.Option(..., "--pool", help="work pool to poll"),
    limit: Optional[int] = typer.Option(None, help="flow runs at once on this worker"),
    name: Optional[str] = typer.Option(None, help="worker name shown in the UI"),
) -> None:
    """Start a process worker on this machine (e.g. the GPU box) for a work pool."""
    import os

    from t3d.flows.deploy import start_worker

    if not os.environ.get("PREFECT_API_URL"):
        _fail_input("PREFECT_API_URL is not set: point it at the Prefect server the flows report to")
    start_worker(pool, limit, name)


@app.command("ls")
def list_runs(store: str = typer.Option("./artifacts", help="artifact store path or fsspec URI")) -> None:
    """List runs and the state of each of their stages."""
    from t3d.store import ArtifactStore

    st = ArtifactStore(store)
    runs = st.runs()
    table = Table(title=f"runs in {store}", title_justify="left")
    for col in ("run", "prompt", "state", "stages", "updated"):
        table.add_column(col, overflow="fold")
    for run_rec in runs:
        marks = []
        for name, key in run_rec.get("stages", {}).items():
            marks.append(f"{name}{'' if st.has_manifest(key) else ' (missing)'}")
        table.add_row(run_rec["run_id"], run_rec.get("prompt", ""), run_rec.get("state", ""), ", ".join(marks), run_rec.get("updated", ""))
    out.print(table)
    keys = st.keys()
    referenced = {k for r in runs for k in r.get("stages", {}).values()}
    out.print(f"{len(keys)} artifacts, {len([k for k in keys if k not in referenced])} unreferenced (t3d gc removes them)")


@app.command()
def show(key: str = typer.Argument(..., help="artifact key (or a unique prefix)"), store: str = typer.Option("./artifacts"), verify: bool = typer.Option(True, help="check every file's sha256")) -> None:
    """Print an artifact's manifest."""
    from t3d.store import ArtifactCorrupt, ArtifactStore

    st = ArtifactStore(store)
    matches = [k for k in st.keys() if k.startswith(key)]
    if len(matches) != 1:
        _fail_input(f"{key}: {'no artifact' if not matches else 'ambiguous: ' + ', '.join(matches[:5])} in {store} (see `t3d ls`)")
    try:
        manifest = st.verify(matches[0]) if verify else st.read_manifest(matches[0])
    except ArtifactCorrupt as exc:
        console.print(f"[red]corrupt:[/] {exc}")
        raise typer.Exit(EXIT_FAILED)
    out.print_json(json.dumps(manifest, default=str))


@app.command()
def gc(store: str = typer.Option("./artifacts"), dry_run: bool = typer.Option(False, "--dry-run")) -> None:
    """Remove artifacts that no run references (and stale temp folders)."""
    from t3d.store import ArtifactStore

    removed = ArtifactStore(store).gc(dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    out.print(f"{verb} {len(removed)} artifacts" + ("".join(f"\n  {k}" for k in removed)))


@app.command()
def doctor() -> None:
    """What this machine has (python, torch, CUDA, tinycudann, nvdiffrast, Prefect) and what each gap costs."""
    from t3d.doctor import checks

    table = Table(title="t3d doctor", title_justify="left")
    for col in ("component", "status", "detail"):
        table.add_column(col, overflow="fold")
    for name, ok, detail in checks():
        table.add_row(name, "[green]ok[/]" if ok else "[yellow]missing[/]", detail)
    out.print(table)


def _mount_optional() -> None:
    import importlib.util

    if importlib.util.find_spec("t3d.cli.prior") is None:
        return
    from t3d.cli.prior import prior_app

    app.add_typer(prior_app, name="prior", help="train, sample and inspect the embedded toy prior")


_mount_optional()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
