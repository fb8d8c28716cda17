"""report.html and gallery.html (t3d/report.py), `t3d view`, and both pages in headless Chromium.

The browser tests load the pages the way a person does (file:// and `t3d view`'s 127.0.0.1 URL)
in Debian's Chromium with WebGL on SwiftShader, and look at the pixels of the 3D viewer.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import trimesh
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from t3d import report
from t3d.cli.main import app
from t3d.cli.view import ViewError, open_server, resolve_target
from t3d.mesh.export import TexturedMesh, export_glb, export_obj, turntable
from t3d.render.raster import TorchRaster

REPO = Path(__file__).resolve().parents[1]
PAGE_CHECK = REPO / "scripts" / "page_check.mjs"
CHROMIUM = os.environ.get("T3D_CHROMIUM", "/usr/bin/chromium")
HOSTILE = "<script>alert(1)</script> a red cube"
VIEWER_BG = (238, 240, 243)  # model-viewer's background in report.py's CSS (#eef0f3)


# ------------------------------------------------------------------------------ a small run's outputs


def cube_mesh() -> TexturedMesh:
    """A unit cube, each side its own colour (a 3x2 grid of texture cells): any view shows 2-3 colours."""
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    verts = box.vertices[box.faces].reshape(-1, 3)
    faces = np.arange(len(verts)).reshape(-1, 3)
    normal = box.face_normals
    side = np.abs(normal).argmax(1) * 2 + (normal[np.arange(len(normal)), np.abs(normal).argmax(1)] > 0)
    cell = np.stack([side % 3, side // 3], 1) / np.array([3.0, 2.0])  # each cell's lower-left corner in UV
    corner = np.array([[0.1, 0.1], [0.9, 0.1], [0.9, 0.9]]) / np.array([3.0, 2.0])
    uvs = (cell[:, None, :] + corner[None]).reshape(-1, 2)
    colours = [(220, 40, 40), (40, 190, 60), (40, 60, 220), (230, 200, 40), (200, 60, 200), (40, 190, 200)]
    tex = np.zeros((64, 96, 3), np.uint8)
    for i, colour in enumerate(colours):
        row = 1 - i // 3  # PNG row 0 is v = 1: cells with v in [0.5, 1] are the top half
        tex[row * 32 : (row + 1) * 32, (i % 3) * 32 : (i % 3 + 1) * 32] = colour
    return TexturedMesh(verts, faces, uvs, tex)


def loss_curve_png(path: Path, seed: int = 0) -> Path:
    """A small line plot, the kind of image the stages write (no matplotlib needed)."""
    img = Image.new("RGB", (320, 200), "white")
    draw = ImageDraw.Draw(img)
    ys = 180 - 150 * np.exp(-np.linspace(0, 4, 60)) + np.random.default_rng(seed).normal(0, 3, 60)
    draw.line([(10 + 5 * i, float(y)) for i, y in enumerate(ys)], fill=(30, 90, 200), width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_outputs(folder: Path, name: str = "cube") -> dict:
    """What flows/outputs.py lays out for one prompt: deliverables at the top, stage images below."""
    mesh = cube_mesh()
    folder.mkdir(parents=True, exist_ok=True)
    export_glb(folder / f"{name}.glb", mesh)
    export_obj(folder, name, mesh)
    turntable(
        folder / f"{name}.glb",
        folder / "turntable.gif",
        n_frames=6,
        size=96,
        strip_path=folder / "turntable.png",
        strip_frames=3,
        video_path=folder / "turntable.mp4",
        video_frames=12,
        raster=TorchRaster("cpu"),
    )
    loss_curve_png(folder / "coarse" / "loss_curve.png")
    shutil.copy(folder / "turntable.png", folder / "coarse" / "turntable.png")
    loss_curve_png(folder / "extract_mesh" / "geometry_loss_curve.png", seed=1)
    return {
        "prompt": HOSTILE,
        "state": "completed",
        "seed": 0,
        "run_id": "run-1234",
        "flow_file": "examples/sds_red_cube.yaml",
        "created": "2025-01-01T12:00:00+00:00",
        "deliverables": {
            "glb": f"{name}.glb",
            "obj": f"{name}.obj",
            "mtl": f"{name}.mtl",
            "texture": f"{name}.png",
            "turntable_gif": "turntable.gif",
            "turntable_png": "turntable.png",
            "turntable_mp4": "turntable.mp4",
        },
        "stages": [
            {
                "name": "coarse",
                "state": "computed",
                "seconds": 12.5,
                "key": "coarse-0123456789abcdef",
                "metrics": {"iou": 0.8123, "color_err": 0.05, "steps": 200},
                "timings": {"render": 3.25, "guidance": 8.0},
                "images": ["coarse/turntable.png"],
                "curves": ["coarse/loss_curve.png"],
            },
            {
                "name": "extract_mesh",
                "state": "cached",
                "seconds": 0.4,
                "key": "extract_mesh-fedcba9876543210",
                "metrics": {"faces": 12},
                "timings": {},
                "images": [],
                "curves": ["extract_mesh/geometry_loss_curve.png"],
            },
        ],
    }


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A run's outputs folder, report.html written."""
    folder = tmp_path_factory.mktemp("outputs") / "a-red-cube"
    summary = make_outputs(folder)
    report.write_report(folder, summary)
    return folder, summary


class _Links(HTMLParser):
    """Every src/href in a page, and the text of <title>."""

    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str, str]] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self._in_title = tag == "title"
        for key, value in attrs:
            if key in ("src", "href") and value is not None:
                self.links.append((tag, key, value))

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data


def parse(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def local_targets(page: Path) -> list[Path]:
    """The files a page's relative links point at (data: URIs aside)."""
    return [page.parent / unquote(v) for _, _, v in parse(page).links if not v.startswith("data:")]


# ------------------------------------------------------------------------------ report.html


def test_report_escapes_the_prompt_links_real_files_and_stays_offline(outputs):
    folder, summary = outputs
    page = report.write_report(folder, summary)
    text = page.read_text(encoding="utf-8")
    assert page == folder / "report.html"
    assert "<script>alert(1)" not in text
    parsed = parse(page)
    assert parsed.title == HOSTILE  # escaped in the source, the prompt itself on screen
    assert "<h1>&lt;script&gt;alert(1)&lt;/script&gt; a red cube</h1>" in text
    assert "http://" not in text and "https://" not in text
    targets = local_targets(page)
    assert targets and all(t.is_file() for t in targets), [t for t in targets if not t.is_file()]
    names = {t.relative_to(folder).as_posix() for t in targets}
    assert {"cube.glb", "cube.obj", "cube.mtl", "cube.png", "turntable.gif", "turntable.png", "turntable.mp4"} <= names
    assert {"coarse/loss_curve.png", "coarse/turntable.png", "extract_mesh/geometry_loss_curve.png"} <= names
    assert report.VIEWER_NAME in names
    # the viewer: the script copied next to the page, the GLB inlined (file:// pages cannot fetch it)
    copied = folder / report.VIEWER_NAME
    assert copied.read_bytes() == report.viewer_script().read_bytes()
    (src,) = [v for tag, key, v in parsed.links if tag == "model-viewer"]
    assert base64.b64decode(src.split(",", 1)[1]) == (folder / "cube.glb").read_bytes()
    assert "camera-controls" in text and "auto-rotate" in text and 'environment-image="neutral"' in text
    # the stage table: each stage's metrics and timings
    assert "0.8123" in text and "12.5 s" in text and "3.2 s" in text and ">cached<" in text
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_report_plays_the_turntable_video(outputs, tmp_path):
    folder, summary = outputs
    fresh = tmp_path / "out"
    shutil.copytree(folder, fresh)
    (fresh / "clip.mp4").write_bytes(b"not decoded here")
    text = report.write_report(fresh, {**summary, "deliverables": {"turntable_mp4": "clip.mp4"}}).read_text()
    assert '<video src="clip.mp4" autoplay loop muted playsinline></video>' in text
    assert 'href="clip.mp4" download' in text


def test_report_leaves_out_what_is_missing(tmp_path):
    loss_curve_png(tmp_path / "coarse" / "loss_curve.png")
    summary = {
        "prompt": "a blue ball",
        "state": "failed",
        "deliverables": {"glb": "gone.glb", "turntable_gif": "turntable.gif"},
        "stages": [
            {
                "name": "coarse",
                "state": "computed",
                "seconds": 3.0,
                "images": ["coarse/turntable.png"],
                "curves": ["coarse/loss_curve.png"],
            },
            {"name": "texture", "state": "failed"},
        ],
    }
    page = report.write_report(tmp_path, summary)
    text = page.read_text(encoding="utf-8")
    assert "<model-viewer" not in text and "No 3D model" in text and "No files were delivered" in text
    assert "gone.glb" not in text and "turntable.gif" not in text and "coarse/turntable.png" not in text
    assert [t.relative_to(tmp_path).as_posix() for t in local_targets(page)] == ["coarse/loss_curve.png"]
    assert "state-failed" in text


def test_report_shows_the_run_error_escaped(tmp_path):
    text = report.write_report(tmp_path, {"prompt": "x", "state": "failed", "error": "texture: <NaN> loss"}).read_text()
    assert '<p class="error">texture: &lt;NaN&gt; loss</p>' in text


def test_report_without_the_viewer_script_says_how_to_get_it(outputs, tmp_path, monkeypatch):
    folder, summary = outputs
    monkeypatch.setenv("T3D_MODEL_VIEWER", str(tmp_path / "absent.js"))
    assert report.viewer_script() is None
    fresh = tmp_path / "out"
    shutil.copytree(folder, fresh, ignore=shutil.ignore_patterns(report.VIEWER_NAME, "report.html"))
    text = report.write_report(fresh, summary).read_text(encoding="utf-8")
    assert "<model-viewer" not in text and "<script src" not in text
    assert "bash scripts/install.sh" in text
    assert 'src="turntable.gif"' in text  # the turntables still show the model
    assert not (fresh / report.VIEWER_NAME).exists()


def test_report_links_a_glb_too_large_to_inline(outputs, tmp_path, monkeypatch):
    folder, summary = outputs
    monkeypatch.setattr(report, "INLINE_GLB_MAX_BYTES", 100)
    fresh = tmp_path / "out"
    shutil.copytree(folder, fresh)
    text = report.write_report(fresh, summary).read_text(encoding="utf-8")
    assert '<model-viewer src="cube.glb"' in text and "t3d view" in text and "data:model" not in text


def test_report_prefect_link_only_for_http_urls(outputs, tmp_path):
    folder, summary = outputs
    fresh = tmp_path / "out"
    shutil.copytree(folder, fresh)
    url = "http://127.0.0.1:4200/runs/flow-run/abc"
    text = report.write_report(fresh, {**summary, "prefect_url": url}).read_text(encoding="utf-8")
    assert re.findall(r"https?://[^\"<]*", text) == [url]
    text = report.write_report(fresh, {**summary, "prefect_url": "javascript:alert(1)"}).read_text(encoding="utf-8")
    assert "javascript:" not in text


def test_report_ranks_the_seeds(outputs, tmp_path):
    folder, summary = outputs
    fresh = tmp_path / "out"
    shutil.copytree(folder, fresh)
    for seed in (3, 7):
        (fresh / "seeds" / str(seed)).mkdir(parents=True)
        shutil.copy(fresh / "turntable.png", fresh / "seeds" / str(seed) / "turntable.png")
        (fresh / "seeds" / str(seed) / "report.html").write_text("<!doctype html><title>seed</title>")
    seeds = [
        {
            "seed": 7,
            "score": 0.61,
            "rank": 2,
            "best": False,
            "metrics": {"iou": 0.61},
            "href": "seeds/7/report.html",
            "thumb": "seeds/7/turntable.png",
        },
        {
            "seed": 3,
            "score": 0.83,
            "rank": 1,
            "best": True,
            "metrics": {"iou": 0.83},
            "href": "seeds/3/report.html",
            "thumb": "seeds/3/turntable.png",
        },
    ]
    seeds.append({"seed": 9, "score": None, "rank": None})  # unranked (it failed): listed last
    page = report.write_report(fresh, {**summary, "seeds": seeds})
    text = page.read_text(encoding="utf-8")
    seeds_html = text[text.index("Seeds (best of N") :]
    assert seeds_html.index("seeds/3/report.html") < seeds_html.index("seeds/7/report.html")
    assert seeds_html.index("seeds/7/report.html") < seeds_html.index('<td class="num">9</td>')
    assert '<tr class="best">' in seeds_html and "★ best" in seeds_html
    assert all(t.is_file() for t in local_targets(page))


# ------------------------------------------------------------------------------ gallery.html


def make_gallery(root: Path, outputs_folder: Path, summary: dict) -> Path:
    """Three prompts that finished (one report each) and one that failed."""
    cards = []
    for i, prompt in enumerate(["a red cube", HOSTILE, "a cube & a <b>tag</b>"]):
        sub = root / f"prompt-{i}"
        shutil.copytree(outputs_folder, sub, dirs_exist_ok=True)
        report.write_report(sub, {**summary, "prompt": prompt})
        cards.append(
            {
                "prompt": prompt,
                "state": "completed",
                "href": f"prompt-{i}/report.html",
                "thumb": f"prompt-{i}/turntable.gif",
                "metrics": {"iou": 0.8 - 0.1 * i},
                "error": None,
                "seconds": 40.0 + i,
            }
        )
    cards.append(
        {
            "prompt": "a <i>broken</i> prompt",
            "state": "failed",
            "href": "prompt-3/report.html",
            "thumb": "prompt-3/turntable.gif",
            "metrics": {},
            "error": "texture: RuntimeError: <NaN> in the loss",
            "seconds": 5.0,
        }
    )
    return report.write_gallery(root / "gallery.html", "batch <prompts.txt>", cards)


def test_gallery_cards_marks_failures_and_escapes(outputs, tmp_path):
    folder, summary = outputs
    page = make_gallery(tmp_path, folder, summary)
    text = page.read_text(encoding="utf-8")
    assert text.count('<article class="card') == 4 and text.count('<article class="card failed">') == 1
    assert "4 prompts, 3 done, 1 failed" in text
    assert "<b>tag</b>" not in text and "<i>broken</i>" not in text and "<script>alert" not in text
    assert "texture: RuntimeError: &lt;NaN&gt; in the loss" in text
    assert parse(page).title == "batch <prompts.txt>"
    assert "prompt-3/" not in text and "no preview" in text  # the failed prompt has no report nor thumb
    targets = local_targets(page)
    assert len(targets) == 9 and all(t.is_file() for t in targets)  # per card: thumb, its link, the title link
    assert "http://" not in text and "https://" not in text


# ------------------------------------------------------------------------------ t3d view


def test_view_resolves_folders_and_pages(outputs, tmp_path):
    folder, summary = outputs
    report.write_report(folder, summary)
    assert resolve_target(folder) == (folder.resolve(), "report.html")
    assert resolve_target(folder / "report.html") == (folder.resolve(), "report.html")
    assert resolve_target(folder / "coarse") == ((folder / "coarse").resolve(), "")
    with pytest.raises(ViewError, match="no such file"):
        resolve_target(tmp_path / "nope")
    with pytest.raises(ViewError, match="not an HTML page"):
        resolve_target(folder / "cube.glb")


def test_view_serves_the_folder_on_loopback(outputs):
    folder, summary = outputs
    report.write_report(folder, summary)
    server, url = open_server(folder, 0)
    try:
        import threading

        threading.Thread(target=server.serve_forever, daemon=True).start()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/report\.html", url)
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200 and b"&lt;script&gt;alert(1)" in resp.read()
        with urllib.request.urlopen(url.replace("report.html", "cube.glb"), timeout=10) as resp:
            assert resp.headers["Content-Type"] == "model/gltf-binary"
            assert resp.read() == (folder / "cube.glb").read_bytes()
    finally:
        server.shutdown()
        server.server_close()


def test_view_port_taken(outputs):
    folder, _ = outputs
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    try:
        with pytest.raises(ViewError, match=f"cannot listen on 127.0.0.1:{taken}"):
            open_server(folder, taken)
    finally:
        blocker.close()


def test_view_default_port_falls_back_to_a_free_one(outputs, monkeypatch):
    import t3d.cli.view as view

    folder, _ = outputs
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    monkeypatch.setattr(view, "DEFAULT_PORT", blocker.getsockname()[1])
    try:
        server, url = open_server(folder)
        server.server_close()
        assert server.server_address[1] != view.DEFAULT_PORT and f":{server.server_address[1]}/" in url
    finally:
        blocker.close()


def test_view_bad_path_is_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["view", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "no such file or folder" in result.output and len(result.output.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ in Chromium


def _browser_or_skip() -> None:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run installs it)")
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the page check runs on node + playwright-core")
    if not (REPO / "web" / "node_modules" / "playwright-core").is_dir() or report.viewer_script() is None:
        pytest.skip("web/node_modules is missing: bash scripts/install.sh installs the viewer and playwright-core")


def page_check(url: str, shot: Path) -> dict:
    out = shot.with_suffix(".json")
    proc = subprocess.run(
        ["node", str(PAGE_CHECK), url, str(shot), str(out), "90000"], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
    return json.loads(out.read_text())


def viewer_pixels(shot: Path) -> tuple[float, float]:
    """(std of the pixel values, fraction of pixels unlike the background) over the viewer's box."""
    px = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)
    differs = np.abs(px - np.array(VIEWER_BG)).max(-1) > 24
    return float(px.std()), float(differs.mean())


def assert_clean(result: dict) -> None:
    assert result["console_errors"] == [] and result["page_errors"] == [], result
    assert result["failed_requests"] == [] and result["http_errors"] == [] and result["external_requests"] == [], result
    assert result["images"] and all(img["naturalWidth"] > 0 for img in result["images"]), result["images"]


@pytest.fixture
def view_server(outputs):
    """`t3d view FOLDER --port 0` as a person runs it; yields the URL it prints."""
    folder, _ = outputs
    proc = subprocess.Popen(
        [sys.executable, "-m", "t3d.cli.main", "view", str(folder), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "t3d view printed no URL within 60 s"
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


@pytest.mark.slow
def test_report_renders_the_model_in_chromium(outputs, view_server, tmp_path):
    _browser_or_skip()
    folder, _ = outputs
    assert view_server.endswith("/report.html") and view_server.startswith("http://127.0.0.1:")
    for how, url in (("file", (folder / "report.html").as_uri()), ("http", view_server)):
        shot = tmp_path / f"viewer-{how}.png"
        result = page_check(url, shot)
        assert_clean(result)
        assert result["loaded"] is True, result
        assert result["box"]["width"] >= 300 and result["box"]["height"] >= 300
        assert len(result["videos"]) == 1
        assert all(v["error"] is None and v["readyState"] >= 2 for v in result["videos"]), result["videos"]
        std, fraction = viewer_pixels(shot)
        print(f"{how}: viewer std {std:.1f}, fraction unlike background {fraction:.3f}, ms {result.get('ms')}")
        # measured: the cube std 69-74, fraction 0.25-0.29; a viewer whose GLB failed to parse std 2.2, 0.000
        assert std > 15 and fraction > 0.08, (how, std, fraction)


@pytest.mark.slow
def test_gallery_loads_every_thumbnail_in_chromium(outputs, tmp_path):
    _browser_or_skip()
    folder, summary = outputs
    page = make_gallery(tmp_path / "batch", folder, summary)
    result = page_check(page.as_uri(), tmp_path / "gallery.png")
    assert_clean(result)
    assert result["loaded"] is None  # no viewer on the gallery
    assert len(result["images"]) == 3


@pytest.mark.slow
def test_page_check_loads_lazy_images_below_the_fold(tmp_path):
    """A real report's stage images are loading="lazy" and sit below the first screen: a page nobody
    scrolls never loads them, and the check used to wait for them forever (found on a 13-image report)."""
    _browser_or_skip()
    Image.new("RGB", (32, 16), (200, 30, 30)).save(tmp_path / "late.png")
    page = tmp_path / "tall.html"
    page.write_text(
        '<!doctype html><html><head><meta charset="utf-8"><title>tall</title></head><body>'
        '<div style="height:5000px"></div><img src="late.png" alt="late" loading="lazy"></body></html>'
    )
    result = page_check(page.as_uri(), tmp_path / "tall.png")
    assert_clean(result)
    assert result["images"] == [{"src": "late.png", "naturalWidth": 32}]
