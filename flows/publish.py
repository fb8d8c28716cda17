"""What a run shows in the Prefect UI: a live progress bar per stage, then previews and metrics.

Artifact keys must be lowercase letters, digits and dashes, so they are built from slugs.
Every call is best-effort: the UI is a view, never a reason for a stage to fail.
"""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path

from t3d.slug import slugify

log = logging.getLogger("t3d")
PREVIEW_LIMIT_BYTES = 600_000  # inline images bigger than this are linked by path instead


def md_escape(text: str) -> str:
    """User text (prompts, errors) as literal markdown: no links, images, HTML or code spans."""
    import html
    import re

    text = html.escape(str(text).replace("\x00", ""), quote=True)
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~>])", r"\\\1", text).replace("\n", " ")


def _key(*parts: str) -> str:
    return "-".join(slugify(p, 40) for p in parts)[:120]


class ProgressPublisher:
    """A stage progress hook: creates a progress artifact, updates it at most every `every_s`."""

    def __init__(self, prompt: str, stage: str, every_s: float = 2.0):
        self.prompt, self.stage, self.every_s = prompt, stage, every_s
        self.artifact_id = None
        self.last = 0.0

    def __call__(self, stage: str, step: int, total: int, postfix: dict) -> None:
        now = time.monotonic()
        if step < total and now - self.last < self.every_s:
            return
        self.last = now
        pct = 100.0 * step / max(total, 1)
        desc = f"{self.stage} {step}/{total}" + "".join(
            f" {k}={v:.4g}" if isinstance(v, float) else f" {k}={v}" for k, v in postfix.items()
        )
        try:
            from prefect.artifacts import create_progress_artifact, update_progress_artifact

            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(
                    pct, key=_key(self.prompt, self.stage, "progress"), description=desc
                )
            else:
                update_progress_artifact(self.artifact_id, pct, description=desc)
        except Exception as exc:
            log.debug("progress artifact not published: %s", exc)


def stage_markdown(prompt: str, result, folder: Path | None) -> str:
    lines = [
        f"### {result.stage}: {result.state} in {result.seconds:.1f}s",
        "",
        f"prompt: {md_escape(prompt)}  ",
        f"key: `{result.key}`",
        "",
    ]
    if result.metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in result.metrics.items()
            if not isinstance(v, (list, dict))
        ]
        lines.append("")
    if folder is not None:
        # Turntables first: what a person wants to see; texture atlases and curves after.
        images = sorted(folder.glob("*.png")) + sorted(folder.glob("*.gif"))
        for image in sorted(images, key=lambda p: (not p.name.startswith("turntable"), p.suffix != ".gif", p.name)):
            data = image.read_bytes()
            if len(data) <= PREVIEW_LIMIT_BYTES:
                mime = "image/gif" if image.suffix == ".gif" else "image/png"
                lines.append(f"![{image.name}](data:{mime};base64,{base64.b64encode(data).decode()})")
            else:
                lines.append(f"`{image}`")
    return "\n".join(lines)


def publish_stage(prompt: str, result) -> None:
    try:
        from prefect.artifacts import create_markdown_artifact

        folder = Path(result.path) if result.path else None
        create_markdown_artifact(
            stage_markdown(prompt, result, folder),
            key=_key(prompt, result.stage),
            description=md_escape(f"{result.stage} for {prompt!r}"),
        )
    except Exception as exc:
        log.debug("stage artifact not published: %s", exc)


def publish_table(rows: list[dict], key: str, description: str) -> None:
    try:
        from prefect.artifacts import create_table_artifact

        safe = [{k: md_escape(v) if isinstance(v, str) else v for k, v in row.items()} for row in rows]
        create_table_artifact(safe, key=_key(key), description=md_escape(description))
    except Exception as exc:
        log.debug("table artifact not published: %s", exc)


def publish_report_link(prompt: str, report: Path) -> None:
    """A markdown artifact pointing at the run's report page (where people look at the asset)."""
    try:
        from prefect.artifacts import create_markdown_artifact

        uri = report.resolve().as_uri().replace("(", "%28").replace(")", "%29")
        folder = str(report.parent).replace("`", "")
        text = "\n".join(
            [
                f"### report: {md_escape(prompt)}",
                "",
                f"[open the report]({uri})  ",
                f"or serve it: `t3d view {folder}`",
            ]
        )
        create_markdown_artifact(text, key=_key(prompt, "report"), description=md_escape(f"report for {prompt!r}"))
    except Exception as exc:
        log.debug("report artifact not published: %s", exc)
