"""`t3d batch`: one flow run per prompt, N at a time, each in its own process; one summary at the end.

Prompts share the artifact store, so stages whose keys match are computed once (the same prompt
at two seeds shares encode_prompt) and the store's claims stop two runs writing the same key. A
failing prompt does not stop the others. Re-running the batch redoes only what is unfinished,
because every finished stage is cached.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from t3d import runner
from t3d.flows.config import ConfigError, load_config
from t3d.flows.outputs import delivery_dir, outputs_root
from t3d.flows.server import PrefectConnection
from t3d.store import ArtifactStore


def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line; '#' comments and blank lines ignored; duplicates collapsed (first kept)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such prompts file (one prompt per line, '#' for comments)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; give one prompt per line ('#' for comments)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror}); check the path and its permissions") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: holds NUL bytes (a binary file?); give one prompt per line ('#' for comments)")
    seen: dict[str, None] = {}
    for line in text.splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            seen.setdefault(" ".join(text.split()), None)
    if not seen:
        raise ConfigError(f"{path}: no prompts in the file (one prompt per line, '#' for comments)")
    return list(seen)


@dataclass
class BatchRow:
    prompt: str
    state: str  # completed | cached | failed
    seconds: float
    run_id: str
    glb: str = ""
    computed_stages: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    error: str = ""
    outputs: str = ""  # the delivery folder (outputs/<slug>/), when this run delivered one


def _row_from_record(
    prompt: str, run_id: str, store: ArtifactStore, seconds: float, returncode: int, tail: str
) -> BatchRow:
    record = next((r for r in store.runs() if r.get("run_id") == run_id), None)
    if record is None:
        return BatchRow(prompt, "failed", seconds, run_id, error=tail or f"exit code {returncode}")
    results = record.get("results", [])
    metrics: dict = {}
    glb = ""
    for res in results:
        metrics.update(
            {f"{res['stage']}.{k}": v for k, v in (res.get("metrics") or {}).items() if isinstance(v, (int, float))}
        )
        if res.get("path"):
            found = sorted(Path(res["path"]).glob("*.glb"))
            glb = str(found[0]) if found else glb
    state = record.get("state", "failed") if returncode == 0 else "failed"
    error = "" if state != "failed" else (record.get("error") or tail or f"exit code {returncode}")
    computed = [r["stage"] for r in results if r.get("state") == "computed"]
    return BatchRow(prompt, state, round(seconds, 2), run_id, glb, computed, metrics, error)


def run_batch(
    flow_file: str | Path,
    prompts: list[str],
    concurrency: int = 1,
    overrides: list[str] | None = None,
    env: dict | None = None,
    on_done: Callable[[BatchRow], None] | None = None,
    prefect: PrefectConnection | None = None,
    out: str | Path | None = None,
) -> list[BatchRow]:
    """Each prompt runs as `t3d run FLOW --prompt P` in a child process (its own flow run).

    With `prefect`, every child reports to that connection's API (started once, here, if need
    be); `env` adds variables on top. Without, the children inherit this environment."""
    cfg = load_config(flow_file, overrides, prompt=prompts[0])  # validate once, before any work
    store = ArtifactStore(cfg.store)
    env = {**(prefect.child_env() if prefect is not None else os.environ), **(env or {})}

    def one(prompt: str) -> BatchRow:
        cmd = [sys.executable, "-m", "t3d.cli.main", "run", str(flow_file), "--prompt", prompt]
        for o in overrides or []:
            cmd += ["--set", o]
        if out is not None:
            cmd += ["--out", str(out)]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        tail = "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or [""])[-1][:300]
        run_id = runner.run_id_for(cfg, prompt, str(flow_file))
        row = _row_from_record(prompt, run_id, store, time.perf_counter() - started, proc.returncode, tail)
        folder = delivery_dir(cfg, prompt, flow_file, out)
        row.outputs = str(folder) if row.state != "failed" and (folder / "report.html").is_file() else ""
        if on_done:
            on_done(row)
        return row

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(one, prompts))


def write_summary(rows: list[BatchRow], base: str | Path) -> tuple[Path, Path]:
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = base.with_suffix(".json"), base.with_suffix(".csv")
    json_path.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    metric_keys = sorted({k for r in rows for k in r.metrics})
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "state", "seconds", "glb", "computed_stages", "error", *metric_keys])
        for r in rows:
            writer.writerow(
                [
                    r.prompt,
                    r.state,
                    r.seconds,
                    r.glb,
                    " ".join(r.computed_stages),
                    r.error,
                    *[r.metrics.get(k, "") for k in metric_keys],
                ]
            )
    return json_path, csv_path


def write_batch_gallery(rows: list[BatchRow], flow_file: str | Path, stem: str, out: str | Path | None = None) -> Path:
    """<outputs>/gallery-<stem>.html: one card per prompt, linking each delivery's report."""
    from t3d.report import write_gallery

    cfg = load_config(flow_file, prompt=rows[0].prompt)
    root = outputs_root(cfg, flow_file, out)
    root.mkdir(parents=True, exist_ok=True)
    cards = []
    for r in rows:
        folder = Path(r.outputs) if r.outputs else None
        thumb = None
        if folder is not None:
            thumb = next(
                (f"{folder.name}/{n}" for n in ("turntable.gif", "turntable.png") if (folder / n).is_file()), None
            )
        cards.append(
            {
                "prompt": r.prompt,
                "state": r.state,
                "href": f"{folder.name}/report.html" if folder is not None else None,
                "thumb": thumb,
                "metrics": {k: v for k, v in r.metrics.items() if k.startswith("export.")},
                "error": r.error or None,
                "seconds": r.seconds,
            }
        )
    return write_gallery(root / f"gallery-{stem}.html", f"batch {stem}", cards)
