"""The pages a person opens after a run: report.html (one prompt) and a batch's gallery.html.

Both are self-contained: no URL leaves the folder (no CDN, no web fonts), so a page opens from a
copied folder, offline, straight from the disk. The 3D view is Google's <model-viewer> (npm
@google/model-viewer, Apache-2.0, installed into web/ by scripts/install.sh): its UMD build, which
bundles three.js, is copied next to report.html and loaded as a classic script. Chromium refuses
ES-module scripts and fetch() on file:// pages, so the GLB goes into the page as a data: URI; only
a GLB over INLINE_GLB_MAX_BYTES is referenced by its relative path instead, and then needs
`t3d view` (a local HTTP server) to show in 3D.

Every string that came from a user (the prompt above all) is HTML-escaped; every path is relative
to the page and is shown only when its file exists, so the page has no broken links.
"""

from __future__ import annotations

import base64
import filecmp
import html
import json
import os
import shutil
from pathlib import Path
from urllib.parse import quote

__all__ = ["viewer_script", "write_report", "write_gallery", "VIEWER_NAME", "INLINE_GLB_MAX_BYTES"]

REPO_ROOT = Path(__file__).resolve().parent.parent
VIEWER_IN_WEB = Path("web/node_modules/@google/model-viewer/dist/model-viewer-umd.min.js")
VIEWER_NAME = "model-viewer-umd.min.js"  # the copy's name next to report.html
# A data: URI costs 4/3 of the GLB in the page; past this the page links the GLB instead.
INLINE_GLB_MAX_BYTES = 48 * 2**20
INSTALL_HINT = "bash scripts/install.sh"

_DELIVERABLE_LABELS = {
    "glb": "GLB (glTF binary, textured)",
    "obj": "OBJ mesh",
    "mtl": "OBJ material",
    "texture": "texture PNG",
    "png": "texture PNG",
    "turntable_mp4": "turntable video (RGB | normals | depth)",
    "turntable_gif": "turntable GIF",
    "turntable_png": "turntable strip PNG",
}


def viewer_script() -> Path | None:
    """model-viewer's self-contained UMD build: T3D_MODEL_VIEWER if set, else the one in web/node_modules."""
    override = os.environ.get("T3D_MODEL_VIEWER")
    path = Path(override) if override else REPO_ROOT / VIEWER_IN_WEB
    return path if path.is_file() else None


# ----------------------------------------------------------------------------------------------
# small pieces
# ----------------------------------------------------------------------------------------------


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _href(rel: str) -> str:
    """A relative path as an attribute value: percent-encoded (spaces, '#', '?'), then escaped."""
    return _esc(quote(str(rel).replace(os.sep, "/"), safe="/"))


def _exists(base: Path, rel: str | None) -> bool:
    return bool(rel) and not Path(rel).is_absolute() and (base / rel).is_file()


def _number(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str, separators=(",", ": "))
    return str(value)


def _seconds(value) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return ""
    if value >= 120:
        return f"{value / 60:.1f} min"
    return f"{value:.1f} s"


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if nbytes < 1024 or unit == "MiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def _pairs(mapping: dict | None, fmt=_number) -> str:
    """A dict as a compact definition list; empty when there is nothing."""
    if not mapping:
        return ""
    rows = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(fmt(v))}</dd>" for k, v in mapping.items())
    return f'<dl class="kv">{rows}</dl>'


def _state(state) -> str:
    state = str(state or "unknown")
    return f'<span class="state state-{_esc(state.lower())}">{_esc(state)}</span>'


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy unless the same bytes are there already (a batch rewrites many pages)."""
    if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
        return
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


_CSS = """
:root { color-scheme: light; --fg: #1d2330; --muted: #5c6475; --line: #d9dde5; --bg: #f6f7f9; --bad: #c62828;
        --ok: #2e7d32; --cached: #00838f; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
       background: var(--bg); }
h1 { font-size: 1.5em; margin: 0 0 6px; overflow-wrap: anywhere; }
h2 { font-size: 1.15em; margin: 28px 0 10px; }
h3 { font-size: 1em; margin: 16px 0 8px; }
a { color: #1a5fb4; }
.meta { color: var(--muted); margin: 0 0 16px; }
.meta span + span::before { content: " · "; }
.state { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 0.85em; color: #fff;
         background: var(--muted); }
.state-computed, .state-completed, .state-ok, .state-done { background: var(--ok); }
.state-cached { background: var(--cached); }
.state-failed, .state-crashed, .state-error { background: var(--bad); }
.row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.panel { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px; }
.viewer { max-width: 860px; }
model-viewer { display: block; width: 100%; height: 520px; background: #eef0f3; border-radius: 6px;
               --poster-color: #eef0f3; }
.turntables video, .turntables img { display: block; max-width: 100%; border-radius: 6px; background: #fff; }
.turntables video { max-height: 300px; }
figure { margin: 0; }
figcaption { color: var(--muted); font-size: 0.85em; margin-top: 4px; overflow-wrap: anywhere; }
table { border-collapse: collapse; background: #fff; width: 100%; }
th, td { border: 1px solid var(--line); padding: 6px 8px; text-align: left; vertical-align: top; }
th { background: #eef0f3; font-weight: 600; }
td.num { text-align: right; white-space: nowrap; }
dl.kv { margin: 0; display: grid; grid-template-columns: max-content auto; gap: 0 10px; font-size: 0.9em; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
.curves img, .stage-images img { max-width: 420px; width: 100%; border: 1px solid var(--line); border-radius: 4px;
                                 background: #fff; }
.note { color: var(--muted); }
.note code { background: #eef0f3; padding: 1px 4px; border-radius: 3px; }
ul.files { margin: 0; padding-left: 18px; }
tr.best { background: #f1f8e9; }
.thumb { width: 96px; height: auto; border-radius: 4px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 16px; }
.card { background: #fff; border: 2px solid var(--line); border-radius: 10px; padding: 10px; display: flex;
        flex-direction: column; gap: 6px; }
.card.failed { border-color: var(--bad); }
.card img { width: 100%; height: auto; border-radius: 6px; background: #fff; }
.card .noimg { aspect-ratio: 1; display: flex; align-items: center; justify-content: center; color: var(--muted);
               background: #eef0f3; border-radius: 6px; }
.card .prompt { font-weight: 600; overflow-wrap: anywhere; }
.error { color: var(--bad); overflow-wrap: anywhere; white-space: pre-wrap; }
.card .error { font-size: 0.9em; }
"""


def _page(title: str, body: str, head_extra: str = "") -> str:
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="t3d">\n'
        '<link rel="icon" href="data:,">\n'  # else a served page asks for /favicon.ico: a 404 in the console
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n{head_extra}</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------------------------
# report.html
# ----------------------------------------------------------------------------------------------


def _viewer_section(folder: Path, glb: str | None, has_script: bool) -> str:
    if not _exists(folder, glb):
        return '<p class="note">No 3D model: this run has no GLB.</p>'
    if not has_script:
        return (
            f'<p class="note" id="viewer-missing">3D view not installed: run <code>{_esc(INSTALL_HINT)}</code> in the '
            "t3d checkout, then write this page again; the turntables below show the model meanwhile.</p>"
        )
    data = (folder / glb).read_bytes()
    if len(data) <= INLINE_GLB_MAX_BYTES:
        src = "data:model/gltf-binary;base64," + base64.b64encode(data).decode("ascii")
        note = ""
    else:
        src = _href(glb)
        note = (
            f'<p class="note">The GLB ({_esc(_size(len(data)))}) is too large to embed: open this page through '
            f"<code>t3d view {_esc(folder.name)}</code> to see it in 3D.</p>"
        )
    return (
        f'<model-viewer src="{src}" alt="{_esc("3D model: " + glb)}" camera-controls auto-rotate '
        'environment-image="neutral" shadow-intensity="0.6" exposure="1" interaction-prompt="none" '
        'touch-action="pan-y"></model-viewer>\n'
        f"{note}"
        '<p class="note" id="viewer-missing" hidden>The 3D viewer script did not load: run '
        f"<code>{_esc(INSTALL_HINT)}</code>, then write this page again.</p>\n"
        "<script>window.addEventListener('load',function(){if(!window.customElements.get('model-viewer'))"
        "{document.getElementById('viewer-missing').hidden=false;}});</script>"
    )


def _turntables_section(folder: Path, deliverables: dict) -> str:
    parts = []
    mp4 = deliverables.get("turntable_mp4")
    if _exists(folder, mp4):
        parts.append(
            f'<figure><video src="{_href(mp4)}" autoplay loop muted playsinline></video>'
            "<figcaption>turntable: RGB | normals | depth</figcaption></figure>"
        )
    for key, caption in (("turntable_gif", "turntable (GIF)"), ("turntable_png", "turntable strip")):
        rel = deliverables.get(key)
        if _exists(folder, rel):
            parts.append(
                f'<figure><img src="{_href(rel)}" alt="{_esc(caption)}"><figcaption>{caption}</figcaption></figure>'
            )
    if not parts:
        return ""
    return '<section><h2>Turntables</h2><div class="row turntables">' + "".join(parts) + "</div></section>"


def _downloads_section(folder: Path, deliverables: dict) -> str:
    items = []
    for key, rel in deliverables.items():
        if not isinstance(rel, str) or not _exists(folder, rel):
            continue
        label = _DELIVERABLE_LABELS.get(key, key)
        size = _size((folder / rel).stat().st_size)
        items.append(f'<li><a href="{_href(rel)}" download>{_esc(Path(rel).name)}</a> — {_esc(label)}, {size}</li>')
    if not items:
        return '<section><h2>Files</h2><p class="note">No files were delivered.</p></section>'
    return '<section><h2>Files</h2><ul class="files">' + "".join(items) + "</ul></section>"


def _stages_section(folder: Path, stages: list[dict]) -> str:
    if not stages:
        return ""
    rows = []
    for st in stages:
        key = str(st.get("key") or "")
        rows.append(
            "<tr>"
            f"<td>{_esc(st.get('name', '?'))}</td><td>{_state(st.get('state'))}</td>"
            f'<td class="num">{_esc(_seconds(st.get("seconds")))}</td>'
            f'<td><code title="{_esc(key)}">{_esc(key.rsplit("-", 1)[-1][:12])}</code></td>'
            f"<td>{_pairs(st.get('metrics'))}</td><td>{_pairs(st.get('timings'), _timing)}</td>"
            "</tr>"
        )
    table = (
        "<table><thead><tr><th>stage</th><th>state</th><th>time</th><th>id</th><th>metrics</th><th>timings</th>"
        "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )
    figures = []
    for st in stages:
        imgs = [rel for rel in st.get("images") or [] if _exists(folder, rel)]
        curves = [rel for rel in st.get("curves") or [] if _exists(folder, rel)]
        if not imgs and not curves:
            continue
        figs = "".join(
            f'<figure class="{cls}"><img src="{_href(rel)}" alt="{_esc(rel)}" loading="lazy">'
            f"<figcaption>{_esc(rel)}</figcaption></figure>"
            for cls, group in (("stage-images", imgs), ("curves", curves))
            for rel in group
        )
        figures.append(f'<h3>{_esc(st.get("name", "?"))}</h3><div class="row">{figs}</div>')
    return "<section><h2>Stages</h2>" + table + "".join(figures) + "</section>"


def _timing(value) -> str:
    return _seconds(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _number(value)


def _seeds_section(folder: Path, seeds: list[dict]) -> str:
    if not seeds:
        return ""
    ranked = sorted(seeds, key=lambda s: (s.get("rank") is None, s.get("rank") or 0))
    rows = []
    for s in ranked:
        thumb = s.get("thumb")
        img = (
            f'<img class="thumb" src="{_href(thumb)}" alt="seed {_esc(s.get("seed"))}">'
            if _exists(folder, thumb)
            else ""
        )
        href = s.get("href")
        link = f'<a href="{_href(href)}">report</a>' if _exists(folder, href) else ""
        best = " ★ best" if s.get("best") else ""
        rows.append(
            f'<tr class="{"best" if s.get("best") else ""}"><td class="num">{_esc(s.get("rank", ""))}{best}</td>'
            f'<td class="num">{_esc(s.get("seed", ""))}</td><td class="num">{_esc(_number(s.get("score", "")))}</td>'
            f"<td>{_pairs(s.get('metrics'))}</td><td>{img}</td><td>{link}</td></tr>"
        )
    return (
        "<section><h2>Seeds (best of N, ranked)</h2><table><thead><tr><th>rank</th><th>seed</th><th>score</th>"
        "<th>metrics</th><th>turntable</th><th></th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></section>"
    )


def _meta_line(summary: dict) -> str:
    items = [_state(summary.get("state"))]
    for key, label in (("seed", "seed"), ("run_id", "run"), ("flow_file", "flow"), ("created", "created")):
        if summary.get(key) not in (None, ""):
            items.append(f"<span>{label} {_esc(summary[key])}</span>")
    url = summary.get("prefect_url")
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        items.append(f'<span><a href="{_esc(url)}">Prefect run</a></span>')
    error = f'<p class="error">{_esc(summary["error"])}</p>' if summary.get("error") else ""
    return '<p class="meta">' + " ".join(items) + "</p>" + error


def write_report(folder: Path, summary: dict) -> Path:
    """folder/report.html for one prompt's run, with the viewer script copied beside it.

    `summary` (JSON-able, paths relative to `folder`): prompt, state, seed, run_id, flow_file,
    created, prefect_url?, error?, deliverables {glb, obj, turntable_gif, turntable_png, turntable_mp4, ...},
    stages [{name, state, seconds, key, metrics, timings, images, curves}], seeds? [{seed, score,
    rank, best, metrics, href, thumb}]. Anything missing is left out of the page.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    deliverables = summary.get("deliverables") or {}
    script = viewer_script()
    if script is not None:
        _copy_atomic(script, folder / VIEWER_NAME)
    has_script = (folder / VIEWER_NAME).is_file()  # a copy from an earlier write also serves
    prompt = str(summary.get("prompt") or "(no prompt)")
    body = (
        f"<header><h1>{_esc(prompt)}</h1>{_meta_line(summary)}</header>\n"
        '<section class="panel viewer">'
        + _viewer_section(folder, deliverables.get("glb"), has_script)
        + "</section>\n"
        + _turntables_section(folder, deliverables)
        + _downloads_section(folder, deliverables)
        + _stages_section(folder, summary.get("stages") or [])
        + _seeds_section(folder, summary.get("seeds") or [])
    )
    head = (
        f'<script src="{_href(VIEWER_NAME)}"></script>\n'
        if has_script and _exists(folder, deliverables.get("glb"))
        else ""
    )
    path = folder / "report.html"
    _write_atomic(path, _page(prompt, body, head))
    return path


# ----------------------------------------------------------------------------------------------
# gallery.html
# ----------------------------------------------------------------------------------------------


def write_gallery(path: Path, title: str, cards: list[dict]) -> Path:
    """One page for a batch: a card per prompt (thumbnail, state, time, metrics), failed ones in red.

    Each card: {prompt, state, href (its report.html), thumb (turntable GIF/PNG), metrics, error,
    seconds}, paths relative to the gallery's folder; a missing file leaves its link or image out.
    """
    path = Path(path)
    base = path.parent
    base.mkdir(parents=True, exist_ok=True)
    html_cards = []
    n_failed = 0
    for card in cards:
        failed = str(card.get("state", "")).lower() == "failed" or bool(card.get("error"))
        n_failed += failed
        prompt = str(card.get("prompt") or "")
        href = card.get("href") if _exists(base, card.get("href")) else None
        thumb = card.get("thumb")
        if _exists(base, thumb):
            pic = f'<img src="{_href(thumb)}" alt="{_esc("turntable: " + prompt)}">'
        else:
            pic = '<div class="noimg">no preview</div>'
        if href:
            pic = f'<a href="{_href(href)}">{pic}</a>'
        title_html = f'<a href="{_href(href)}">{_esc(prompt)}</a>' if href else _esc(prompt)
        error = f'<div class="error">{_esc(card["error"])}</div>' if card.get("error") else ""
        html_cards.append(
            f'<article class="card{" failed" if failed else ""}">{pic}<div class="prompt">{title_html}</div>'
            f"<div>{_state(card.get('state'))} {_esc(_seconds(card.get('seconds')))}</div>"
            f"{_pairs(card.get('metrics'))}{error}</article>"
        )
    counts = f"{len(cards)} prompt{'s' if len(cards) != 1 else ''}, {len(cards) - n_failed} done, {n_failed} failed"
    body = (
        f'<header><h1>{_esc(title)}</h1><p class="meta">{_esc(counts)}</p></header>\n'
        f'<main class="cards">{"".join(html_cards)}</main>'
    )
    _write_atomic(path, _page(title, body))
    return path
