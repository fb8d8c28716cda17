"""Deliverables by name: `<outputs>/<name>/` holds a run's files and its report.html.

The artifact store is content-addressed (export-<hash>/...), which is right for caching and wrong
for people. After a run, its deliverables are copied (not linked: an edited copy must never
corrupt a hash-verified artifact) into a hidden sibling folder, the report is written there, and
the folder is swapped in for the old one. A re-run therefore refreshes the folder whole, and a
crash mid-delivery leaves the previous delivery as it was, never a mix of two runs.

Layout of one delivery:
  NAME.glb, NAME.obj/.mtl/.png, turntable.{mp4,gif,png}   the export stage's files
  stages/<stage>/*.png|gif                                 every stage's previews and loss curves
  seeds/<seed>/...                                         best-of-N: each seed's files and report
  report.html (+ the viewer script)                        the page (t3d/report.py)
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from t3d.slug import slugify

log = logging.getLogger("t3d")
PREVIEW_SUFFIXES = (".png", ".gif", ".mp4")
DELIVERABLES = {  # report key -> file name pattern in the export folder
    "glb": "*.glb",
    "obj": "*.obj",
    "mtl": "*.mtl",
    "turntable_mp4": "turntable.mp4",
    "turntable_gif": "turntable.gif",
    "turntable_png": "turntable.png",
}


def outputs_root(cfg, flow_file: str | Path | None, out: str | Path | None = None) -> Path:
    """`--out DIR` if given, else flow.yaml's `outputs:` relative to the flow file (or the cwd)."""
    if out is not None:
        return Path(out).expanduser().resolve()
    root = Path(cfg.outputs).expanduser()
    if not root.is_absolute():
        root = (Path(flow_file).resolve().parent if flow_file else Path.cwd()) / root
    return root.resolve()


def check_outputs_root(cfg, flow_file: str | Path | None, out: str | Path | None = None) -> Path:
    """Make sure deliveries can be written before minutes of compute, not after: the root is (or
    becomes) a writable folder. Raises OSError naming the path and what is wrong."""
    root = outputs_root(cfg, flow_file, out)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} is a file, not a folder")
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    probe.write_bytes(b"")
    probe.unlink()
    return root


def delivery_dir(cfg, prompt: str, flow_file: str | Path | None, out: str | Path | None = None) -> Path:
    """<outputs>/<slug of the prompt>/: predictable from the prompt alone (a batch of one flow file,
    whose `name` every prompt shares, still gets one folder per prompt)."""
    return outputs_root(cfg, flow_file, out) / slugify(prompt)


def run_summary(run, folder: Path, *, seed: int, flow_file: str | Path | None, prefix: str = "") -> dict:
    """Copy one run's deliverables and previews into `folder` (under `prefix`); return the report's
    summary of it (paths relative to `folder`)."""
    deliverables: dict[str, str] = {}
    stages = []
    for result in run.results:
        src = Path(result.path) if result.path else None
        manifest = _manifest(src)
        images, curves = [], []
        if src is not None and src.is_dir():
            if result.stage == "export":
                for kind, pattern in DELIVERABLES.items():
                    for path in sorted(src.glob(pattern))[:1]:
                        deliverables[kind] = _copy(path, folder, prefix + path.name)
                for path in sorted(src.glob("*.png")):  # the OBJ's texture travels with it
                    if not path.name.startswith("turntable"):
                        _copy(path, folder, prefix + path.name)
            else:
                for path in sorted(p for p in src.iterdir() if p.suffix in PREVIEW_SUFFIXES):
                    rel = _copy(path, folder, f"{prefix}stages/{result.stage}/{path.name}")
                    (curves if "loss" in path.name else images).append(rel)
        stages.append(
            {
                "name": result.stage,
                "state": result.state,
                "seconds": round(result.seconds, 2),
                "key": result.key,
                "metrics": _plain(result.metrics),
                "timings": manifest.get("timings", {}),
                "images": images,
                "curves": curves,
            }
        )
    return {
        "prompt": run.prompt,
        "state": run.state,
        "seed": seed,
        "run_id": run.run_id,
        "flow_file": str(flow_file) if flow_file else None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "error": run.error,
        "deliverables": deliverables,
        "stages": stages,
    }


def deliver(
    cfg,
    run,
    flow_file: str | Path | None,
    out: str | Path | None = None,
    *,
    seeds: list[tuple[int, object, dict]] | None = None,
    prefect_url: str | None = None,
) -> Path | None:
    """Publish `run` (the chosen seed's run) at <outputs>/<name>/, replacing what was there.

    seeds: best-of-N, ranked best first, as (seed, run, score entry); each gets seeds/<seed>/ with
    its own files and report, and the main report lists them. A failed run delivers nothing and
    leaves an earlier delivery in place (returns None)."""
    from t3d.report import write_report

    if run.state == "failed":
        return None
    final = delivery_dir(cfg, run.prompt, flow_file, out)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep(final)
    staging = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    staging.mkdir()
    try:
        seed = seeds[0][0] if seeds else cfg.seed
        summary = run_summary(run, staging, seed=seed, flow_file=flow_file)
        summary["prefect_url"] = prefect_url
        if seeds:
            summary["seeds"] = []
            for rank, (s, seed_run, score) in enumerate(seeds, 1):
                sub = staging / "seeds" / str(s)
                sub.mkdir(parents=True)
                seed_summary = run_summary(seed_run, sub, seed=s, flow_file=flow_file)
                seed_summary["score"] = score
                write_report(sub, seed_summary)
                summary["seeds"].append(
                    {
                        "seed": s,
                        "rank": rank,
                        "best": rank == 1,
                        "score": score.get("score") if isinstance(score, dict) else score,
                        "metrics": _headline_metrics(seed_run),
                        "href": f"seeds/{s}/report.html",
                        "thumb": f"seeds/{s}/" + seed_summary["deliverables"].get("turntable_png", "")
                        if seed_summary["deliverables"].get("turntable_png")
                        else None,
                    }
                )
        (staging / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        write_report(staging, summary)
        _swap_in(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _headline_metrics(run) -> dict:
    """The last stage's numbers (the delivered file's quality on toy prompts)."""
    for result in reversed(run.results):
        if result.metrics:
            return {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {}


def _swap_in(staging: Path, final: Path) -> None:
    """Replace `final` by `staging`: the old folder is renamed away first, so `final` is always one
    whole delivery (or, for an instant, absent), never a mix."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        final.rename(old)
    staging.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sweep(final: Path) -> None:
    """Remove leftovers of deliveries that crashed (their process is gone)."""
    for leftover in final.parent.glob(f".{final.name}.*-*-*"):
        try:
            pid = int(leftover.name.rsplit("-", 2)[-2])
        except ValueError:
            continue
        if not _alive(pid):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _copy(src: Path, folder: Path, rel: str) -> str:
    dest = folder / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return rel


def _manifest(folder: Path | None) -> dict:
    try:
        return json.loads((folder / "manifest.json").read_text()) if folder is not None else {}
    except (OSError, ValueError):
        return {}


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str)) or v is None}
