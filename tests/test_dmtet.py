"""Marching tetrahedra, the SDF initialisation and the geometry-refinement step of extract_mesh."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from t3d.mesh.dmtet import laplacian_loss, marching_tets, render_shaded, sdf_from_density, tet_grid

R = 32
LO = np.full(3, -1.0)
SPACING = np.full(3, 2.0 / (R - 1))


@pytest.fixture(scope="module")
def grid():
    return tet_grid(R, LO, SPACING)


def _signed_volumes(verts, tets):
    p = verts[tets]
    return torch.linalg.det(torch.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]], 1)) / 6


def test_tet_grid_fills_the_box_without_overlap(grid):
    verts, tets = grid
    assert verts.shape == (R**3, 3) and tets.shape == (6 * (R - 1) ** 3, 4)
    assert torch.allclose(verts[0], torch.tensor([-1.0, -1.0, -1.0])) and torch.allclose(verts[-1], torch.ones(3))
    vol = _signed_volumes(verts, tets).abs()
    assert torch.allclose(vol, torch.full_like(vol, float(SPACING[0]) ** 3 / 6), rtol=1e-3)  # equal, none degenerate
    assert abs(float(vol.sum()) - 8.0) < 1e-3  # together exactly the box


def test_marching_tets_sphere_is_closed_outward_and_on_the_surface(grid):
    verts, tets = grid
    centre = torch.tensor([0.1, -0.05, 0.0])
    sdf = (verts - centre).norm(dim=-1) - 0.55
    mv, faces = marching_tets(verts, tets, sdf)
    m = trimesh.Trimesh(mv.numpy(), faces.numpy(), process=False)
    assert m.is_watertight and m.is_winding_consistent
    assert m.volume > 0  # outward: positive signed volume
    assert abs(m.volume - 4 / 3 * np.pi * 0.55**3) / (4 / 3 * np.pi * 0.55**3) < 0.03
    r = (mv - centre).norm(dim=-1)
    assert (r - 0.55).abs().max() < 0.2 * SPACING[0]  # chords of a sphere: just inside it
    outward = np.einsum("ij,ij->i", m.face_normals, m.triangles_center - centre.numpy())
    assert (outward > 0).all()


def test_marching_tets_empty_and_gradient_sign(grid):
    verts, tets = grid
    mv, faces = marching_tets(verts, tets, torch.ones(len(verts)))
    assert mv.shape == (0, 3) and faces.shape == (0, 3)
    sdf = ((verts).norm(dim=-1) - 0.5).requires_grad_(True)
    mv, faces = marching_tets(verts, tets, sdf)
    volume = (torch.linalg.cross(mv[faces[:, 1]], mv[faces[:, 2]], dim=-1) * mv[faces[:, 0]]).sum() / 6
    volume.backward()
    g = sdf.grad
    # raising the SDF anywhere near the surface moves it inward: the volume can only shrink
    assert (g <= 1e-9).all() and (g < 0).sum() > 100
    near = (verts.norm(dim=-1) - 0.5).abs() < SPACING[0]
    assert (g[~near] == 0).all() or (g[~near].abs().max() < g[near].abs().max())


def test_sdf_from_density_puts_the_surface_at_the_threshold():
    verts, tets = tet_grid(R, LO, SPACING)
    dist = verts.norm(dim=-1).reshape(R, R, R).numpy()
    sigma = 40.0 * (dist < 0.6)  # a hard-edged ball: occupancy only, as after thresholding
    sdf = sdf_from_density(sigma, 1.0, SPACING)
    assert sdf.shape == (R, R, R) and sdf[R // 2, R // 2, R // 2] < -0.4 and sdf[0, 0, 0] > 0.8
    mv, _ = marching_tets(verts, tets, torch.as_tensor(sdf).reshape(-1))
    r = mv.norm(dim=-1)
    assert abs(float(r.mean()) - 0.6) < 0.75 * SPACING[0] and float(r.std()) < 0.5 * SPACING[0]
    with pytest.raises(ValueError, match="empty or full"):
        sdf_from_density(np.zeros((R, R, R)), 1.0, SPACING)


def test_laplacian_loss_prefers_smooth_surfaces(grid):
    verts, tets = grid
    sdf = verts.norm(dim=-1) - 0.5
    smooth_v, faces = marching_tets(verts, tets, sdf)
    noisy_v = smooth_v + 0.02 * torch.randn(smooth_v.shape, generator=torch.Generator().manual_seed(0))
    assert laplacian_loss(noisy_v, faces) > 3 * laplacian_loss(smooth_v, faces)


def test_render_shaded_moves_the_silhouette_with_the_sdf(grid):
    from t3d.render.cameras import CameraParams, orbit_cameras

    verts, tets = grid
    sdf = (verts.norm(dim=-1) - 0.45).requires_grad_(True)
    mv, faces = marching_tets(verts, tets, sdf)
    cams = orbit_cameras(CameraParams(), 2, elevation_deg=15.0)
    rgb, cov = render_shaded(mv, faces, cams, 32, lambda p: torch.tensor([0.86, 0.12, 0.1]).expand(len(p), 3))
    assert rgb.shape == (2, 3, 32, 32) and cov.shape == (2, 1, 32, 32)
    assert torch.allclose(rgb[:, :, 0, 0], torch.ones(2, 3))  # white background at the corner
    centre = rgb[:, :, 16, 16]
    assert (centre[:, 0] > 2 * centre[:, 1]).all()  # red object, lit
    cov.sum().backward()
    # more coverage needs a bigger shape: the gradient asks to lower the SDF (expand)
    assert float(sdf.grad.sum()) < 0


def test_extract_mesh_stage_refines_geometry_and_resumes(tmp_path):
    from t3d.fields.nerf import NeRFField
    from t3d.stages import default_registry
    from t3d.stages.coarse import _default_field, save_field
    from tests.test_mesh_export import _ctx

    reg = default_registry()
    coarse = tmp_path / "coarse"
    coarse.mkdir()
    save_field(NeRFField(_default_field()), coarse)
    enc = reg["encode_prompt"]
    ectx = _ctx(enc, enc.params(), {}, tmp_path / "enc")
    enc.run(ectx)
    stage = reg["extract_mesh"]
    params = stage.params(
        resolution=32,
        texture_size=64,
        max_faces=1500,
        preview_size=32,
        preview_frames=4,
        geometry_steps=4,
        geometry_resolution=24,
        geometry_render_size=32,
        geometry_batch_size=1,
        checkpoint_every=2,
    )
    ctx = _ctx(stage, params, {"coarse": coarse, "encode_prompt": ectx.out}, tmp_path / "mesh")
    stage.run(ctx)
    assert ctx.metrics["watertight"] and 0 < ctx.metrics["faces"] <= 1500
    assert {"geometry_losses.json", "geometry_loss_curve.png", "mesh.glb"} <= {p.name for p in ctx.out.iterdir()}
    assert "geometry_s" in ctx.timings and 0 <= ctx.metrics["iou"] <= 1
    # a checkpoint at step 2 resumes to the same result
    assert (ctx.checkpoint_dir / "state.json").exists()
    ctx_b = _ctx(stage, params, {"coarse": coarse, "encode_prompt": ectx.out}, tmp_path / "mesh_b")
    ctx_b.checkpoint_dir = ctx.checkpoint_dir
    stage.run(ctx_b)
    assert ctx_b.metrics["resumed_from"] == 2
    assert ctx_b.metrics["faces"] == ctx.metrics["faces"] and ctx_b.metrics["area"] == ctx.metrics["area"]
