"""The `t3d` command. Thin: parse arguments, call flows/ and the store, print, pick the exit code.

Exit codes: 0 ok, 1 a stage failed, 2 bad input.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    help="t3d: text to textured 3D asset by score distillation, in cached, resumable stages.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
_DEBUG = {"on": os.environ.get("T3D_DEBUG", "").lower() in ("1", "true", "yes")}  # or --debug anywhere


def _quiet_third_parties(verbose: bool) -> None:
    """Before Prefect/transformers are imported: their console chatter (HTTP request logs, telemetry
    errors, weight-loading bars) stays out of the output unless --verbose. Prefect's run logs still
    reach its API and UI."""
    if verbose:
        return
    for key, value in {
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL": "CRITICAL",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL": "CRITICAL",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "DIFFUSERS_VERBOSITY": "error",
    }.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore")


class _LineFormatter(logging.Formatter):
    """t3d's lines as plain text, one line each (no wrapping), warnings and errors marked."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def _setup_logging(verbose: bool) -> None:
    """t3d's own lines on stderr; everything else only with --verbose."""
    from rich.logging import RichHandler

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter("%(message)s"))
    t3d_log = logging.getLogger("t3d")
    t3d_log.handlers[:] = [handler]
    t3d_log.setLevel(logging.DEBUG if verbose else logging.INFO)
    t3d_log.propagate = False
    root = logging.getLogger()
    everything_else = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    everything_else.setLevel(
        logging.INFO if verbose else logging.CRITICAL
    )  # handler level: Prefect's run loggers propagate here
    root.handlers[:] = [everything_else]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)


def _fail_input(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_BAD_INPUT)


@app.command()
def run(
    flow_file: Path = typer.Argument(..., help="flow YAML, e.g. examples/sds_red_cube.yaml"),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set stages.coarse.steps=200 (repeatable)"),
    from_stage: str | None = typer.Option(None, "--from", help="force this stage and every later one to re-run"),
    prompt: str | None = typer.Option(None, "--prompt", help="run this prompt instead of the file's prompt(s)"),
    no_prefect: bool = typer.Option(False, "--no-prefect", help="run the stages in-process without Prefect"),
    seeds: int | None = typer.Option(
        None, "--seeds", min=1, max=64, help="best-of-N: run N seeds and deliver the one the prior scores best"
    ),
    out_dir: Path | None = typer.Option(
        None, "--out", help="deliver into DIR/<name>/ (default: the flow's `outputs:`, ./outputs next to it)"
    ),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="also show Prefect's, HTTP and library logs"),
) -> None:
    """Run a flow: finished stages are reused (cached), the first missing one continues; the result is
    delivered by name to outputs/<name>/ with a report.html."""
    _quiet_third_parties(verbose)
    from t3d.flows.config import ConfigError, check_environment, load_config
    from t3d.stages import registry_from_env

    registry = registry_from_env()
    try:
        cfg = load_config(flow_file, [*set_, *([f"seeds={seeds}"] if seeds else [])], registry, prompt=prompt)
        check_environment(cfg, str(flow_file))
    except ConfigError as exc:
        _fail_input(str(exc))
    _warn_prompts(cfg, cfg.prompt_list())
    _check_outputs(cfg, flow_file, out_dir)
    from t3d.flows.best_of_n import run_seeds
    from t3d.flows.server import PrefectConnection

    _setup_logging(verbose)
    failed = False
    with PrefectConnection(on_wait=lambda msg: console.status(msg, spinner="dots")) as prefect:
        for text in cfg.prompt_list():
            try:
                outcome = run_seeds(
                    cfg,
                    text,
                    registry,
                    flow_file=str(flow_file),
                    force_from=from_stage,
                    use_prefect=not no_prefect,
                    prefect=prefect,
                )
            except ValueError as exc:  # planning errors: bad --from, disabled dependencies
                _fail_input(f"{flow_file}: {exc}")
            for _, result, _ in sorted(outcome.ranked, key=lambda r: r[0]):
                _print_run(result, seeded=len(outcome.ranked) > 1)
            if len(outcome.ranked) > 1:
                _print_ranking(outcome)
            _deliver(cfg, outcome, flow_file, out_dir, prefect)
            failed = failed or any(r.state == "failed" for _, r, _ in outcome.ranked)
    raise typer.Exit(EXIT_FAILED if failed else EXIT_OK)


def _check_outputs(cfg, flow_file: Path, out_dir: Path | None) -> None:
    """Exit 2 now, not after the run, when the outputs folder cannot be written."""
    from t3d.flows.outputs import check_outputs_root

    try:
        check_outputs_root(cfg, flow_file, out_dir)
    except OSError as exc:
        where = "--out" if out_dir is not None else f"{flow_file}: 'outputs'"
        reason = exc.strerror or str(exc)
        path = exc.filename or ""
        _fail_input(f"{where}: cannot write deliveries there ({reason}{': ' + str(path) if path else ''})")


def _warn_prompts(cfg, prompts: list[str]) -> None:
    """Say before the run which words the prior will ignore (a toy prior knows a few words only)."""
    from t3d.flows.config import prompt_warnings

    for line in prompt_warnings(cfg, prompts):
        console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)


def _deliver(cfg, outcome, flow_file: Path, out_dir: Path | None, prefect) -> None:
    """Copy the (best) run's files to outputs/<name>/ with its report; say where."""
    from t3d.flows.outputs import deliver

    best = outcome.best
    if best.state == "failed":
        return
    seeds = outcome.ranked if len(outcome.ranked) > 1 else None
    ui = os.environ.get("PREFECT_API_URL", "").rstrip("/").removesuffix("/api") or None
    try:
        folder = deliver(cfg, best, str(flow_file), out_dir, seeds=seeds, prefect_url=ui)
    except OSError as exc:
        console.print(f"[red]could not write the outputs folder: {escape(str(exc))}[/]", highlight=False)
        return
    if folder is None:
        return
    report = folder / "report.html"
    shown = _shown_path(folder)
    out.print(
        f"outputs: {shown}/\nreport:  {shown}/report.html   (or: t3d view {shown})", soft_wrap=True, highlight=False
    )
    api = prefect.connected_url if prefect is not None else None
    if api:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from t3d.flows.publish import publish_report_link

        with temporary_settings(updates={PREFECT_API_URL: api}):
            publish_report_link(best.prompt, report)


def _shown_path(path: Path) -> Path:
    """The path as a user would type it: relative to the working directory when it is under it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def _print_ranking(outcome) -> None:
    table = Table(title=escape(f"best of {len(outcome.ranked)} seeds: {outcome.prompt[:50]!r}"), title_justify="left")
    for col in ("rank", "seed", "score", "state", "quality"):
        table.add_column(col, no_wrap=True)
    for rank, (seed, result, score) in enumerate(outcome.ranked, 1):
        metrics = result.results[-1].metrics if result.results else {}
        quality = " ".join(
            f"{k}={metrics[k]:.3f}" for k in ("iou", "color_err") if isinstance(metrics.get(k), (int, float))
        )
        value = score.get("score")
        table.add_row(
            f"{rank}{' (best)' if rank == 1 else ''}",
            str(seed),
            f"{value:.4g}" if isinstance(value, (int, float)) else "-",
            result.state,
            quality,
        )
    out.print(table)


def _print_run(result, seeded: bool = False) -> None:
    """The summary: one row per stage, at most 80 columns; then the file a person wants."""
    from t3d.store import short_id

    seed = f" seed {result.seed}" if seeded else ""
    table = Table(title=escape(f"{result.prompt[:60]!r}{seed}  [{result.state}]"), title_justify="left")
    table.add_column("stage", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("s", justify="right", no_wrap=True)
    table.add_column("id", no_wrap=True)
    table.add_column("quality", overflow="fold")
    for r in result.results:
        style = {"cached": "cyan", "computed": "green"}.get(r.state, "red")
        quality = " ".join(
            f"{k}={r.metrics[k]:.3f}" for k in ("iou", "color_err") if isinstance(r.metrics.get(k), (int, float))
        )
        table.add_row(r.stage, f"[{style}]{r.state}[/]", f"{r.seconds:.1f}", short_id(r.key), quality)
    if result.error:
        table.add_row(result.failed_stage or "?", "[red]failed[/]", "", "", "")
    out.print(table)
    if result.results and not result.error:
        last = result.results[-1]
        out.print(f"deliverable: {_headline_file(last.path)}", soft_wrap=True, highlight=False)
    if result.error:
        console.print(
            f"[red]{escape(result.error)}[/]\nFix the cause and run the same command again: finished stages "
            "are reused.",
            highlight=False,
            soft_wrap=True,
        )


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
    summary: Path | None = typer.Option(
        None, help="summary path without suffix (writes .csv and .json); default batch-<file>"
    ),
    data: Path | None = typer.Option(
        None, help="Prefect data folder when t3d starts the server itself (default ~/.cache/t3d/prefect)"
    ),
    out_dir: Path | None = typer.Option(
        None, "--out", help="deliver into DIR/<slug>/ and DIR/gallery-<file>.html (default: the flow's outputs:)"
    ),
) -> None:
    """Generate every prompt of a list: one flow run each; a failing prompt does not stop the others.
    Writes a gallery page with one card per prompt."""
    _quiet_third_parties(False)
    from t3d.flows.batch import read_prompts, run_batch, write_batch_gallery, write_summary
    from t3d.flows.config import ConfigError, load_config
    from t3d.flows.server import PrefectConnection

    try:
        prompts = read_prompts(prompts_file)
        cfg = load_config(flow, set_, prompt=prompts[0])
    except ConfigError as exc:
        _fail_input(str(exc))
    _warn_prompts(cfg, prompts)
    _check_outputs(cfg, flow, out_dir)
    _setup_logging(False)  # Prefect's exit chatter ("Still processing items: ...") stays off the screen
    done = []

    def report(row) -> None:
        done.append(row)
        colour = {"failed": "red", "cached": "cyan"}.get(row.state, "green")
        console.print(
            f"[{len(done)}/{len(prompts)}] [{colour}]{row.state}[/] {row.prompt!r} ({row.seconds:.1f}s)",
            highlight=False,
        )

    def wait(msg: str):
        return console.status(f"{msg} (for this batch)", spinner="dots")

    with PrefectConnection(on_wait=wait, data_dir=data, ui=True) as prefect:
        api = prefect.api_url()
        if api is None:
            console.print(
                f"[yellow]warning:[/] Prefect unavailable ({prefect.problem}): the prompts run without it",
                highlight=False,
                soft_wrap=True,
            )
        elif prefect.server is not None:
            console.print(f"Prefect API: {api}", highlight=False)
        rows = run_batch(
            flow,
            prompts,
            concurrency,
            set_,
            env={"TQDM_DISABLE": os.environ.get("TQDM_DISABLE", "1")},
            on_done=report,
            prefect=prefect,
            out=out_dir,
        )
        base = summary or Path(f"batch-{prompts_file.stem}")
        json_path, csv_path = write_summary(rows, base)
        gallery = write_batch_gallery(rows, flow, prompts_file.stem, out_dir)
        if api:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            from t3d.flows.publish import publish_table

            with temporary_settings(updates={PREFECT_API_URL: api}):
                publish_table(
                    [
                        {"prompt": r.prompt, "state": r.state, "seconds": r.seconds, "glb": r.glb, "error": r.error}
                        for r in rows
                    ],
                    f"batch-{prompts_file.stem}",
                    f"batch {prompts_file.name}",
                )
    table = Table(title=f"batch {prompts_file} ({concurrency} at a time)", title_justify="left")
    failed = any(r.state == "failed" for r in rows)
    for col in ("prompt", "state", "seconds", "folder", "iou / colour err", *(["error"] if failed else [])):
        table.add_column(col, overflow="fold")
    for r in rows:
        where = f"{Path(r.outputs).name}/" if r.outputs else ""
        cells = [r.prompt, r.state, f"{r.seconds:.1f}", where, _final_quality(r.metrics)]
        table.add_row(*cells, *([r.error] if failed else []))
    out.print(table)
    roots = {_shown_path(Path(r.outputs).parent) for r in rows if r.outputs}
    if roots:
        out.print(f"outputs: {', '.join(f'{root}/' for root in sorted(roots))} (a folder per prompt)", soft_wrap=True)
    out.print(f"summary: {csv_path} and {json_path}")
    shown = _shown_path(gallery)
    out.print(f"gallery: {shown}   (or: t3d view {shown})", soft_wrap=True, highlight=False)
    raise typer.Exit(EXIT_FAILED if failed else EXIT_OK)


def _final_quality(metrics: dict) -> str:
    """The last stage's toy-world IoU and colour error ("0.875 / 0.052"); the CSV has every metric."""
    stages = [k.rsplit(".", 1)[0] for k in metrics if k.endswith((".iou", ".color_err"))]
    if not stages:
        return ""
    last = stages[-1]
    return " / ".join(
        f"{metrics[f'{last}.{m}']:.3f}" if f"{last}.{m}" in metrics else "-" for m in ("iou", "color_err")
    )


@app.command()
def server(
    host: str = typer.Option("127.0.0.1", help="address to bind (keep 127.0.0.1 unless you mean to expose it)"),
    port: int = typer.Option(4200),
    data: Path | None = typer.Option(
        None, help="Prefect database and settings folder (default ~/.cache/t3d/prefect, where `t3d run` reports)"
    ),
    prepare: bool = typer.Option(
        False,
        "--prepare",
        help="only create or upgrade the folder's Prefect database, then exit (install.sh does so)",
    ),
) -> None:
    """Start Prefect's server and UI; runs report to it once PREFECT_API_URL points at it."""
    import signal
    import time

    from t3d.flows.server import PrefectConnection, default_data_dir, prepare_data_dir

    if prepare:
        try:
            folder = prepare_data_dir(data)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            console.print(f"[red]{escape(str(exc))}[/]", highlight=False)
            raise typer.Exit(EXIT_FAILED) from None
        out.print(f"Prefect database ready in {folder}", highlight=False, soft_wrap=True)
        return

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)  # SIGTERM stops the server too, like Ctrl-C
    signal.signal(signal.SIGHUP, on_term)
    with PrefectConnection(
        on_wait=lambda msg: console.status(msg, spinner="dots"),
        data_dir=data or default_data_dir(),
        ui=True,
        dedicated=True,
        host=host,
        port=port,
    ) as prefect:
        if prefect.api_url() is None:
            console.print(f"[red]the Prefect server did not start: {escape(prefect.problem or '')}[/]", highlight=False)
            raise typer.Exit(EXIT_FAILED)
        srv = prefect.server
        out.print(
            f"Prefect UI:  {srv.ui_url}\nAPI:         {srv.api_url}\ndata:        {srv.data_dir}\nlog:         "
            f"{srv.log_path}"
        )
        out.print(
            f"In another shell:  export PREFECT_API_URL={srv.api_url}   then t3d run / t3d batch report here. "
            "Ctrl-C stops."
        )
        try:
            while srv.alive():
                time.sleep(1)
            console.print(f"[red]the Prefect server stopped; see {srv.log_path}[/]", highlight=False)
            raise typer.Exit(EXIT_FAILED) from None
        except KeyboardInterrupt:
            pass


@app.command()
def deploy(
    pool: str = typer.Option(..., "--pool", help="Prefect work pool (created as a process pool if missing)"),
) -> None:
    """Register the t3d-prompt and t3d-stage deployments on a work pool (needs PREFECT_API_URL)."""
    import os

    from t3d.flows.deploy import deploy as do_deploy

    if not os.environ.get("PREFECT_API_URL"):
        _fail_input("PREFECT_API_URL is not set: start `t3d server` (or point at your Prefect server) first")
    for name, dep_id in do_deploy(pool).items():
        out.print(f"deployment {name}  ({dep_id})")
    out.print(
        f"Route a flow with `executor: {{pool: {pool}}}` (whole flow) or on one stage; start workers with "
        f"`t3d worker --pool {pool}`."
    )


@app.command()
def worker(
    pool: str = typer.Option(..., "--pool", help="work pool to poll"),
    limit: int | None = typer.Option(None, help="flow runs at once on this worker"),
    name: str | None = typer.Option(None, help="worker name shown in the UI"),
) -> None:
    """Start a process worker on this machine (e.g. the GPU box) for a work pool."""
    import os

    from t3d.flows.deploy import start_worker

    if not os.environ.get("PREFECT_API_URL"):
        _fail_input("PREFECT_API_URL is not set: point it at the Prefect server the flows report to")
    start_worker(pool, limit, name)


def _open_store(store: str):
    """An existing store for ls/show/gc: a typo'd --store is an error, never a new empty folder."""
    from t3d.flows.config import ConfigError, check_store_uri
    from t3d.store import ArtifactStore

    try:
        check_store_uri(store, "--store", must_exist=True)
        return ArtifactStore(store if "://" in store or "::" in store else os.path.expanduser(store))
    except ConfigError as exc:
        _fail_input(str(exc))


@app.command("ls")
def list_runs(store: str = typer.Option("./artifacts", help="artifact store path or fsspec URI")) -> None:
    """List runs and the state of each of their stages."""
    st = _open_store(store)
    runs = st.runs()
    table = Table(title=f"runs in {store}", title_justify="left")
    for col in ("run", "prompt", "state", "stages", "updated"):
        table.add_column(col, overflow="fold")
    for run_rec in runs:
        marks = []
        for name, key in run_rec.get("stages", {}).items():
            marks.append(f"{name}{'' if st.has_manifest(key) else ' (missing)'}")
        table.add_row(
            str(run_rec.get("run_id", "?")),
            str(run_rec.get("prompt", "")),
            str(run_rec.get("state", "")),
            ", ".join(marks),
            str(run_rec.get("updated", "")),
        )
    out.print(table)
    from t3d.store import KEY_RE

    keys = [k for k in st.keys() if KEY_RE.match(k)]  # other names under objects/ are not t3d's, and gc leaves them
    referenced = {k for r in runs for k in r.get("stages", {}).values()}
    out.print(
        f"{len(keys)} artifacts, {len([k for k in keys if k not in referenced])} unreferenced (t3d gc removes them)"
    )


@app.command()
def show(
    key: str = typer.Argument(..., help="artifact key, a unique prefix, or the id a run prints"),
    store: str = typer.Option("./artifacts"),
    verify: bool = typer.Option(True, help="check every file's sha256"),
) -> None:
    """Print an artifact's manifest."""
    from t3d.store import ArtifactCorrupt

    st = _open_store(store)
    matches = [k for k in st.keys() if k.startswith(key) or k.rsplit("-", 1)[-1].startswith(key)]
    if len(matches) != 1:
        _fail_input(
            f"{key}: {'no artifact' if not matches else 'ambiguous: ' + ', '.join(matches[:5])} in {store} "
            "(see `t3d ls`)"
        )
    try:
        manifest = st.verify(matches[0]) if verify else st.read_manifest(matches[0])
    except ArtifactCorrupt as exc:
        console.print(f"[red]corrupt:[/] {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    out.print_json(json.dumps(manifest, default=str))


@app.command()
def gc(store: str = typer.Option("./artifacts"), dry_run: bool = typer.Option(False, "--dry-run")) -> None:
    """Remove artifacts that no run references (and stale temp folders)."""
    from t3d.store import StoreError

    try:
        removed = _open_store(store).gc(dry_run=dry_run)
    except StoreError as exc:
        _fail_input(f"gc stopped, nothing deleted: {exc}")
    verb = "would remove" if dry_run else "removed"
    out.print(f"{verb} {len(removed)} item(s)" + ("".join(f"\n  {k}" for k in removed)))


@app.command()
def doctor() -> None:
    """What this machine has (python, torch, CUDA, tinycudann, nvdiffrast, Prefect) and what each gap costs."""
    from t3d.cli.doctor import checks

    table = Table(title="t3d doctor", title_justify="left")
    for col in ("component", "status", "detail"):
        table.add_column(col, overflow="fold")
    for name, ok, detail in checks():
        table.add_row(name, "[green]ok[/]" if ok else "[yellow]missing[/]", detail)
    out.print(table)


@app.command()
def view(
    path: Path = typer.Argument(..., help="an outputs folder, a report.html or a gallery.html"),
    port: int | None = typer.Option(None, help="port on 127.0.0.1 (default 8765, or a free one if taken; 0: any)"),
) -> None:
    """Serve a run's report or a batch's gallery on 127.0.0.1 and print its URL; Ctrl-C stops."""
    from t3d.cli.view import ViewError, open_server, serve_until_interrupted

    try:
        server, url = open_server(path, port)
    except ViewError as exc:
        _fail_input(str(exc))
    out.print(url, soft_wrap=True, highlight=False)
    sys.stdout.flush()
    console.print("serving on 127.0.0.1 only; Ctrl-C stops", highlight=False)
    serve_until_interrupted(server)


def _mount_optional() -> None:
    import importlib.util

    if importlib.util.find_spec("t3d.cli.prior") is None:
        return
    from t3d.cli.prior import prior_app

    app.add_typer(prior_app, name="prior", help="train, sample and inspect the embedded toy prior")


_mount_optional()


def main() -> int:
    """The console entry point: environment and input problems end in one line, not a traceback."""
    from t3d.flows.config import ConfigError
    from t3d.priors import PriorNotFoundError

    if "--debug" in sys.argv[1:]:  # anywhere on the line: `t3d run flow.yaml --debug`
        sys.argv.remove("--debug")
        _DEBUG["on"] = True
    try:
        app()
    except SystemExit:
        raise
    except (ConfigError, PriorNotFoundError) as exc:
        if _DEBUG["on"]:
            raise
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        console.print("interrupted: run the same command again to resume", highlight=False)
        return 130
    except Exception as exc:
        if _DEBUG["on"]:
            raise
        console.print(
            f"[bold red]error:[/] {type(exc).__name__}: {escape(str(exc))} (add --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
