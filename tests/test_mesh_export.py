"""Mesh extraction, clean-up, UV unwrap, baking, GLB/OBJ export (validated) and the turntable."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from t3d.backends import BackendsParams
from t3d.fields.hashgrid import choose_hashgrid
from t3d.mesh.export import (
    TexturedMesh,
    bake_texture,
    check_name,
    export_glb,
    export_obj,
    load_textured,
    turntable,
    unwrap,
)
from t3d.mesh.extract import (
    auto_threshold,
    clean_mesh,
    decimate,
    drop_mirrored_pairs,
    extract_mesh,
    largest_component,
    orient_outward,
)
from t3d.render.raster import TorchRaster
from t3d.runner import Backends, prior_loader
from tests.contexts import stage_context
from tests.gltf_check import assert_valid_glb

REPO = Path(__file__).resolve().parents[1]
CENTER = torch.tensor([0.1, -0.05, 0.0])


def sphere_density(radius=0.5, width=0.01, peak=50.0, center=CENTER):
    """A NeRF-like density: ~peak inside, a smooth but thin fall-off at the surface, 0 outside."""
    return lambda p: peak * torch.sigmoid((radius - (p - center).norm(dim=-1)) / width)


# ------------------------------------------------------------------------------ extract_mesh


@pytest.fixture(scope="module")
def sphere_mesh():
    return extract_mesh(sphere_density(), resolution=64, bound=1.0)


def test_extract_sphere_watertight_radius_outward(sphere_mesh):
    m = sphere_mesh
    assert m.is_watertight and m.is_winding_consistent
    r = np.linalg.norm(m.vertices - CENTER.numpy(), axis=1)
    assert abs(r.mean() - 0.5) / 0.5 < 0.04
    assert r.std() < 0.01
    assert m.volume > 0
    outward = np.einsum("ij,ij->i", m.face_normals, m.triangles_center - CENTER.numpy())
    assert (outward > 0).all()
    assert 0 < m.metadata["threshold"] < 50


def test_threshold_is_scale_free_and_explicit_threshold_works():
    a = extract_mesh(sphere_density(peak=20.0), 48, 1.0)
    b = extract_mesh(sphere_density(peak=200.0), 48, 1.0)
    ra = np.linalg.norm(a.vertices - CENTER.numpy(), axis=1).mean()
    rb = np.linalg.norm(b.vertices - CENTER.numpy(), axis=1).mean()
    assert abs(ra - 0.5) < 0.03 and abs(rb - 0.5) < 0.03
    c = extract_mesh(sphere_density(peak=20.0), 48, 1.0, threshold=10.0)
    assert c.metadata["threshold"] == 10.0
    rc = np.linalg.norm(c.vertices - CENTER.numpy(), axis=1).mean()
    assert abs(rc - 0.5) < 0.02  # sigmoid midpoint is the true radius


def test_auto_threshold_rejects_empty_field():
    with pytest.raises(ValueError):
        auto_threshold(np.zeros((8, 8, 8)), 0.1)
    with pytest.raises(ValueError):
        extract_mesh(lambda p: torch.zeros(p.shape[0]), 16, 1.0)


def test_largest_component_drops_floaters_and_world_mapping():
    big = sphere_density(0.4, center=torch.tensor([-0.3, 0.0, 0.0]))
    small = sphere_density(0.12, center=torch.tensor([0.6, 0.5, 0.5]))
    m = extract_mesh(lambda p: big(p) + small(p), 64, bound=[[-1, -1, -1], [1, 1, 1]], threshold=25.0)
    assert m.is_watertight
    c = m.vertices.mean(0)
    assert np.allclose(c, [-0.3, 0.0, 0.0], atol=0.02)  # world coordinates, floater gone
    both = extract_mesh(lambda p: big(p) + small(p), 64, 1.0, threshold=25.0, keep_largest=False)
    assert len(both.split(only_watertight=False)) == 2
    assert len(largest_component(both).faces) == len(m.faces)


def test_decimate_respects_budget_and_orientation(sphere_mesh):
    assert len(sphere_mesh.faces) > 3000
    d = decimate(sphere_mesh, 1000)
    assert 0 < len(d.faces) <= 1000
    d = orient_outward(d)
    assert d.volume > 0
    small = decimate(d, 10**6)
    assert len(small.faces) == len(d.faces)
    m = extract_mesh(sphere_density(), 48, 1.0, max_faces=500)
    assert len(m.faces) <= 500 and m.volume > 0


def test_a_mirrored_flap_from_decimation_is_dropped_and_the_surface_stays_closed():
    """The refined red cube's mesh once had a triangle and its mirror image hinged on a surface
    edge: no hole, but a non-manifold edge, so not watertight."""
    ball = trimesh.creation.icosphere(subdivisions=2)
    a, b = ball.faces[0][:2]
    tip = len(ball.vertices)
    verts = np.vstack([ball.vertices, ball.vertices[[a, b]].mean(0) * 1.01])
    flapped = trimesh.Trimesh(verts, np.vstack([ball.faces, [[a, b, tip], [b, a, tip]]]), process=False)
    assert not flapped.is_watertight and flapped.is_volume is False
    fixed = drop_mirrored_pairs(flapped)
    assert fixed.is_watertight and len(fixed.faces) == len(ball.faces) and len(fixed.vertices) == len(ball.vertices)
    assert np.allclose(fixed.volume, ball.volume)
    assert drop_mirrored_pairs(ball) is ball  # nothing to drop: untouched
    cleaned = clean_mesh(verts, flapped.faces, max_faces=len(flapped.faces))  # under budget: no decimation
    assert cleaned.is_watertight


def test_orient_outward_fixes_inverted_mesh():
    m = trimesh.creation.icosphere(subdivisions=2)
    m.invert()
    assert m.volume < 0
    assert orient_outward(m).volume > 0
    half = trimesh.creation.icosphere(subdivisions=2)
    half.update_faces(half.triangles_center[:, 2] > 0)
    half.invert()
    fixed = orient_outward(half)
    assert (np.einsum("ij,ij->i", fixed.face_normals, fixed.triangles_center) > 0).mean() > 0.99


# ------------------------------------------------------------------------------ unwrap, bake, export


RASTER = TorchRaster("cpu")


def color_fn(p):
    """Front (+x) red, back (-x) blue, top (+z) green: checks every flip on the way out and back."""
    r = (p[:, 0] > 0.15).float()
    g = (p[:, 2] > 0.3).float()
    b = (p[:, 0] < -0.15).float()
    return torch.stack([r, g, b], -1)


@pytest.fixture(scope="module")
def textured():
    m = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    v, f, uv, vmap = unwrap(m, max_faces=800, texture_size=128)
    assert len(f) <= 800 and v.shape[0] == uv.shape[0] == vmap.shape[0]
    assert uv.min() >= 0 and uv.max() <= 1
    png = bake_texture(v, f, uv, color_fn, size=128, padding=4, raster=RASTER)
    return TexturedMesh(v, f, uv, png)


def test_bake_texture_colours_match_color_fn(textured):
    tm = textured
    assert tm.texture.shape == (128, 128, 3) and tm.texture.dtype == np.uint8
    # each vertex's texel (PNG row 0 = v 1) holds the colour of its world point
    u = np.clip((tm.uvs[:, 0] * 128).astype(int), 0, 127)
    row = np.clip(((1 - tm.uvs[:, 1]) * 128).astype(int), 0, 127)
    texel = tm.texture[row, u].astype(float) / 255
    want = color_fn(torch.tensor(tm.verts)).numpy()
    clear = (np.abs(tm.verts[:, 0]) > 0.2) & (np.abs(tm.verts[:, 2] - 0.3) > 0.05)
    assert (np.abs(texel[clear] - want[clear]).max(1) < 0.05).mean() > 0.95


def glb_json(path):
    data = Path(path).read_bytes()
    magic, version, _ = struct.unpack("<III", data[:12])
    assert magic == 0x46546C67 and version == 2
    n, kind = struct.unpack("<II", data[12:20])
    assert kind == 0x4E4F534A
    return json.loads(data[20 : 20 + n])


def test_glb_roundtrip_material_and_validator(textured, tmp_path):
    path = export_glb(tmp_path / "asset.glb", textured)
    mat = glb_json(path)["materials"][0]["pbrMetallicRoughness"]
    assert mat["metallicFactor"] == 0.0 and mat["roughnessFactor"] == 1.0
    assert mat["baseColorFactor"] == [1.0, 1.0, 1.0, 1.0] and "baseColorTexture" in mat

    loaded = trimesh.load(path, force="mesh", process=False)
    assert loaded.visual.uv is not None and len(loaded.visual.uv) == len(textured.uvs)
    assert np.allclose(loaded.visual.uv, textured.uvs, atol=1e-5)
    img = np.asarray(loaded.visual.material.baseColorTexture.convert("RGB"))
    assert img.shape == textured.texture.shape
    assert np.array_equal(img[5, 7], textured.texture[5, 7]) and np.array_equal(img, textured.texture)
    back = load_textured(path)
    assert np.allclose(back.verts, textured.verts, atol=1e-5)  # y-up rotation undone

    assert_valid_glb(path)


def test_obj_export_files_and_reload(textured, tmp_path):
    paths = export_obj(tmp_path / "out", "red-ball_01", textured)
    assert {p.name for p in paths.values()} == {"red-ball_01.obj", "red-ball_01.mtl", "red-ball_01.png"}
    mtl = paths["mtl"].read_text()
    assert "Kd 1.000000 1.000000 1.000000" in mtl and "map_Kd red-ball_01.png" in mtl
    loaded = trimesh.load(paths["obj"], force="mesh", process=False)
    assert loaded.visual.uv is not None
    img = np.asarray(loaded.visual.material.image.convert("RGB"))
    assert img.shape == (128, 128, 3) and np.array_equal(img, textured.texture)
    assert np.array_equal(np.asarray(Image.open(paths["png"])), textured.texture)
    back = load_textured(paths["obj"])
    assert len(back.faces) == len(textured.faces)


def test_names_must_be_slug_safe(textured, tmp_path):
    for bad in ["../x", "a b", "", "x/y", ".hidden", "é"]:
        with pytest.raises(ValueError):
            export_obj(tmp_path, bad, textured)
    assert check_name("cube-red_2.v1") == "cube-red_2.v1"


def test_turntable_renders_the_exported_file(textured, tmp_path):
    glb = export_glb(tmp_path / "a.glb", textured)
    frames = turntable(
        glb, tmp_path / "a.gif", n_frames=4, size=64, strip_path=tmp_path / "strip.png", shading=0.0, raster=RASTER
    )
    assert frames.shape == (4, 64, 64, 3)
    gif = Image.open(tmp_path / "a.gif")
    assert gif.n_frames == 4
    assert Image.open(tmp_path / "strip.png").size == (4 * 64, 64)
    # az 0 looks at the front (+x: red); az 180 at the back (blue); the top rows show +z (green)
    assert tuple(frames[0][32, 32]) == (255, 0, 0)
    assert tuple(frames[2][32, 32]) == (0, 0, 255)
    top = frames[0][14, 32].astype(int)
    assert top[1] > 200
    assert tuple(frames[0][1, 1]) == (255, 255, 255)  # background


# ------------------------------------------------------------------------------ the stages


def _ctx(stage, params, inputs, out, prompt="a red cube"):

    out.mkdir(parents=True, exist_ok=True)
    return stage_context(
        out.parent,
        stage.name,
        params=params,
        prompt=prompt,
        inputs=inputs,
        out=out,
        checkpoint_dir=out.parent / f"{stage.name}.ckpt",
        backends=Backends(BackendsParams(), "cpu"),
        prior_loader=prior_loader("embedded", "cpu"),
        show_progress=True,
    )


def test_extract_mesh_and_export_stages(tmp_path):
    from t3d.fields.nerf import NeRFField, save_field
    from t3d.stages import default_registry
    from t3d.stages.coarse import _default_field
    from t3d.stages.extract_mesh import load_mesh

    reg = default_registry()
    assert list(reg).index("extract_mesh") < list(reg).index("export")
    coarse = tmp_path / "coarse"
    coarse.mkdir()
    save_field(
        NeRFField(_default_field(), choose_hashgrid("torch", "cpu")), coarse
    )  # untrained: the blob, a grey ball of radius ~0.25

    stage = reg["extract_mesh"]
    params = stage.params(
        resolution=48, texture_size=128, max_faces=2000, preview_size=48, preview_frames=4, geometry={"steps": 0}
    )
    ctx = _ctx(stage, params, {"coarse": coarse}, tmp_path / "mesh")
    stage.run(ctx)
    assert {"mesh.glb", "texture.png", "turntable.gif", "turntable.png"} <= {p.name for p in ctx.out.iterdir()}
    assert ctx.metrics["watertight"] and 0 < ctx.metrics["faces"] <= 2000
    assert ctx.backend["raster"]["backend"] == "torch"
    tm = load_mesh(ctx.out)
    r = np.linalg.norm(tm.verts, axis=1)
    assert 0.15 < r.mean() < 0.4 and r.std() < 0.02
    assert np.abs(tm.texture.astype(int) - 127).max() < 40  # sigmoid of a near-zero albedo head: grey

    stage = reg["export"]
    ctx2 = _ctx(
        stage,
        stage.params(turntable_size=32, turntable_frames=4),
        {"extract_mesh": ctx.out},
        tmp_path / "export",
        prompt="A Red Cube!",
    )
    stage.run(ctx2)
    names = {p.name for p in ctx2.out.iterdir()}
    assert {
        "a-red-cube.glb",
        "a-red-cube.obj",
        "a-red-cube.mtl",
        "a-red-cube.png",
        "turntable.gif",
        "turntable.png",
        "turntable.mp4",
    } <= names
    mat = glb_json(ctx2.out / "a-red-cube.glb")["materials"][0]["pbrMetallicRoughness"]
    assert mat["metallicFactor"] == 0.0 and mat["roughnessFactor"] == 1.0
    with pytest.raises(ValueError):
        stage.params(name="../evil")
