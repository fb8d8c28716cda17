"""The MP4 turntable: [RGB | normals | depth] from one render pass, H.264 that reads back, the export stage's file."""

from __future__ import annotations

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from t3d.mesh.export import (
    DEPTH_HALF_RANGE,
    TexturedMesh,
    bake_texture,
    export_glb,
    render_turntable,
    turntable,
    unwrap,
    write_turntable_video,
)
from t3d.render.raster import TorchRaster
from tests.contexts import stage_context

RASTER = TorchRaster("cpu")
SIZE = 64
RADIUS = 2.5


@pytest.fixture(scope="module")
def red_cube():
    """A unit cube (faces at +-0.5) textured plain red."""
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    v, f, uv, _ = unwrap(box, max_faces=None, texture_size=64)
    png = bake_texture(v, f, uv, lambda p: torch.tensor([[0.9, 0.1, 0.1]]).expand(len(p), 3), size=64, raster=RASTER)
    return TexturedMesh(v, f, uv, png)


@pytest.fixture(scope="module")
def video(red_cube, tmp_path_factory):
    """8 views at elevation 0 from az 45: frame 0 looks at the vertical edge between the +x and +y faces."""
    folder = tmp_path_factory.mktemp("video")
    gif_frames = turntable(
        red_cube,
        folder / "t.gif",
        n_frames=4,
        size=SIZE,
        elevation_deg=0.0,
        radius=RADIUS,
        start_deg=45.0,
        shading=0.0,
        video_path=folder / "t.mp4",
        video_frames=8,
        raster=RASTER,
    )
    frames, meta = read_mp4(folder / "t.mp4")
    return {"folder": folder, "gif_frames": gif_frames, "frames": frames, "meta": meta}


def read_mp4(path) -> tuple[np.ndarray, dict]:
    """All frames [N,H,W,3] and the container's metadata, read with imageio's ffmpeg plugin."""
    reader = imageio.get_reader(path, format="FFMPEG")
    try:
        return np.stack(list(reader.iter_data())), reader.get_meta_data()
    finally:
        reader.close()


def panels(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return frame[:, :SIZE].astype(int), frame[:, SIZE : 2 * SIZE].astype(int), frame[:, 2 * SIZE :].astype(int)


def test_mp4_reads_back_with_three_panels(video):
    frames = video["frames"]
    assert frames.shape == (8, SIZE, 3 * SIZE, 3)
    assert video["meta"]["codec"] == "h264" and video["meta"]["fps"] == pytest.approx(24)
    assert video["meta"]["pix_fmt"].startswith("yuv420p")
    # the GIF (every 2nd view of the same pass) keeps its frames and layout
    assert video["gif_frames"].shape == (4, SIZE, SIZE, 3)
    assert Image.open(video["folder"] / "t.gif").n_frames == 4


def test_rgb_panel_is_red_on_white(video):
    rgb, _, _ = panels(video["frames"][0])
    r, g, b = rgb[SIZE // 2, SIZE // 2 - 6]
    assert r > 180 and g < 70 and b < 70
    assert rgb[2, 2].min() > 240  # background


def test_normals_panel_shows_each_face_normal(video):
    _, normal, _ = panels(video["frames"][0])
    left, right = normal[SIZE // 2, SIZE // 2 - 8], normal[SIZE // 2, SIZE // 2 + 8]
    # az 45: the +x face (normal (1,0,0) -> (255,128,128)) is on the left, +y ((128,255,128)) on the right
    assert np.abs(left - [255, 128, 128]).max() < 25
    assert np.abs(right - [128, 255, 128]).max() < 25
    assert normal[2, 2].min() > 240  # white background
    # a frame a quarter turn on shows other faces: the left face's colour changes
    later = panels(video["frames"][2])[1][SIZE // 2, SIZE // 2 - 8]
    assert np.abs(later - left).max() > 100


def test_depth_panel_is_brighter_where_nearer(video):
    _, _, depth = panels(video["frames"][0])
    row = depth[SIZE // 2, :, 0]
    edge, side = row[SIZE // 2], row[SIZE // 2 - 12]
    assert edge > side + 15  # the edge facing the camera is nearer than the face beside it
    # fixed mapping: the edge is sqrt(0.5) nearer than the centre, so nearness (1.2 + 0.707) / 2.4
    expected = 255 * (DEPTH_HALF_RANGE + 0.5**0.5) / (2 * DEPTH_HALF_RANGE)
    assert abs(edge - expected) < 12
    assert depth[2, 2].max() < 15  # black background: infinitely far
    assert np.abs(depth[SIZE // 2, SIZE // 2 - 12] - depth[SIZE // 2, SIZE // 2 - 12, 0:1]).max() <= 6  # grey


def test_one_pass_gives_the_gif_the_same_frames_as_rendering_it_alone(red_cube, video):
    alone = render_turntable(
        red_cube, 4, SIZE, elevation_deg=0.0, radius=RADIUS, start_deg=45.0, shading=0.0, raster=RASTER
    )
    assert np.abs(alone.rgb.astype(int) - video["gif_frames"].astype(int)).max() <= 1


def test_odd_sizes_are_padded_to_even(red_cube, tmp_path):
    views = render_turntable(red_cube, 2, 33, radius=RADIUS, raster=RASTER)
    path = write_turntable_video(tmp_path / "odd.mp4", views, fps=24)
    frames = read_mp4(path)[0]
    assert frames.shape == (2, 34, 100, 3)


def test_missing_ffmpeg_fails_clearly_and_leaves_no_file(red_cube, tmp_path, monkeypatch):
    import imageio_ffmpeg

    def no_ffmpeg():
        raise RuntimeError("No ffmpeg exe could be found.")

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", no_ffmpeg)
    monkeypatch.setattr(imageio_ffmpeg._io, "get_ffmpeg_exe", no_ffmpeg)
    views = render_turntable(red_cube, 2, 16, radius=RADIUS, raster=RASTER)
    with pytest.raises(RuntimeError, match="turntable video t.mp4 with ffmpeg"):
        write_turntable_video(tmp_path / "t.mp4", views)
    assert not (tmp_path / "t.mp4").exists()


def test_export_stage_writes_the_mp4(red_cube, tmp_path):
    from t3d.stages import default_registry

    source = tmp_path / "extract_mesh"
    export_glb(source / "mesh.glb", red_cube)
    stage = default_registry()["export"]
    assert stage.version == "2"
    params = stage.params(turntable_size=32, turntable_frames=4)
    out = tmp_path / "export"
    out.mkdir()
    ctx = stage_context(tmp_path, "export", params=params, inputs={"extract_mesh": source}, out=out)
    stage.run(ctx)
    names = {p.name for p in out.iterdir()}
    assert {"a-red-cube.glb", "turntable.gif", "turntable.png", "turntable.mp4"} <= names
    frames, meta = read_mp4(out / "turntable.mp4")
    assert frames.shape == (4, 32, 96, 3)  # None: the GIF's frames, from the same pass
    assert meta["fps"] == pytest.approx(12)  # one turn as long as the GIF's
    assert Image.open(out / "turntable.gif").n_frames == 4
    assert ctx.timings["turntable_mp4_s"] > 0

    off = stage.params(turntable_size=32, turntable_frames=4, turntable_video=False)
    out2 = tmp_path / "export2"
    out2.mkdir()
    stage.run(stage_context(tmp_path, "export", params=off, inputs={"extract_mesh": source}, out=out2))
    assert "turntable.mp4" not in {p.name for p in out2.iterdir()}
    with pytest.raises(ValueError, match="multiple of"):
        stage.params(turntable_frames=24, turntable_video_frames=36)
