"""Marching tetrahedra, the SDF initialisation and the geometry-refinement step of extract_mesh."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from t3d.mesh.dmtet import laplacian_loss, marching_tets, render_shaded, sdf_from_density, tet_edges, tet_grid
from t3d.render.raster import TorchRaster

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


def _reference_marching_tets(verts, tets, sdf):
    """marching_tets as first written (per-case corner sorts, torch.unique of the crossed edges):
    the fast version, with its lookup tables and edges found once, must give the same bits."""
    n = verts.shape[0]
    cases = ((1, (((0, 1), (0, 2), (0, 3)),)), (3, (((0, 3), (1, 3), (2, 3)),)))
    cases += ((2, (((0, 2), (0, 3), (1, 3)), ((0, 2), (1, 3), (1, 2)))),)
    occ_t = (sdf < 0)[tets]
    n_in = occ_t.sum(1)
    keep = (n_in > 0) & (n_in < 4)
    tv, n_in = tets[keep], n_in[keep]
    q = torch.gather(tv, 1, torch.argsort((~occ_t[keep]).to(torch.int8), dim=1, stable=True))
    tris, owner = [], []
    for count, edge_lists in cases:
        sel = (n_in == count).nonzero().squeeze(1)
        for edges in edge_lists:
            tris.append(torch.stack([torch.stack([q[sel, i], q[sel, j]], -1) for i, j in edges], 1))
            owner.append(sel)
    ends, owner = torch.cat(tris), torch.cat(owner)
    a, b = torch.minimum(ends[..., 0], ends[..., 1]), torch.maximum(ends[..., 0], ends[..., 1])
    uniq, inv = torch.unique((a * n + b).reshape(-1), return_inverse=True)
    ea, eb, faces = uniq // n, uniq % n, inv.reshape(-1, 3)
    s_a, s_b = sdf[ea], sdf[eb]
    w = (s_a / (s_a - s_b)).unsqueeze(-1)
    mverts = verts[ea] + w * (verts[eb] - verts[ea])
    p = mverts.detach()[faces]
    normal = torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=-1)
    corners, k = verts[q[owner]], n_in[owner].unsqueeze(-1).float()
    is_in = (torch.arange(4)[None, :] < n_in[owner][:, None]).float().unsqueeze(-1)
    centre_in = (corners * is_in).sum(1) / k
    centre_out = (corners * (1 - is_in)).sum(1) / (4 - k)
    flip = (normal * (centre_out - centre_in)).sum(-1) < 0
    return mverts, torch.where(flip[:, None], faces[:, [0, 2, 1]], faces)


@pytest.mark.parametrize("banded", [False, True])
def test_marching_tets_equals_the_reference_bit_for_bit(grid, banded):
    verts, tets = grid
    noise = 0.3 * float(SPACING[0]) * torch.randn(len(verts), generator=torch.Generator().manual_seed(3))
    sdf = ((verts - torch.tensor([0.07, 0.0, -0.1])).norm(dim=-1) - 0.6 + noise).requires_grad_(True)
    if banded:  # as GeometryTrainer keeps them: only tets near the surface
        near = sdf.detach().abs() < 3 * float(SPACING[0])
        tets = tets[near[tets].all(1)]
    want_v, want_f = _reference_marching_tets(verts, tets, sdf)
    got_v, got_f = marching_tets(verts, tets, sdf, tet_edges(tets, len(verts)))
    assert want_f.shape[0] > 1000
    assert torch.equal(got_f, want_f) and torch.equal(got_v, want_v)
    weights = torch.randn(got_v.shape, generator=torch.Generator().manual_seed(4))
    (want_g,) = torch.autograd.grad((want_v * weights).sum(), sdf)
    (got_g,) = torch.autograd.grad((got_v * weights).sum(), sdf)
    assert torch.equal(got_g, want_g)


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
    # only ends of edges that cross the surface move it: nothing farther than a cube diagonal
    beyond = (verts.norm(dim=-1) - 0.5).abs() >= 3**0.5 * SPACING[0]
    assert beyond.sum() > 20000 and (g[beyond] == 0).all()


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
    red = torch.tensor([0.86, 0.12, 0.1])
    rgb, cov = render_shaded(mv, faces, cams, 32, lambda p: red.expand(len(p), 3), TorchRaster("cpu"))
    assert rgb.shape == (2, 3, 32, 32) and cov.shape == (2, 1, 32, 32)
    assert torch.allclose(rgb[:, :, 0, 0], torch.ones(2, 3))  # white background at the corner
    centre = rgb[:, :, 16, 16]
    assert (centre[:, 0] > 2 * centre[:, 1]).all()  # red object, lit
    cov.sum().backward()
    # more coverage needs a bigger shape: the gradient asks to lower the SDF (expand)
    assert float(sdf.grad.sum()) < 0


def test_extract_mesh_stage_refines_geometry_and_resumes(tmp_path):
    from t3d.fields.hashgrid import choose_hashgrid
    from t3d.fields.nerf import NeRFField, save_field
    from t3d.stages import default_registry
    from t3d.stages.coarse import _default_field
    from tests.test_mesh_export import _ctx

    reg = default_registry()
    coarse = tmp_path / "coarse"
    coarse.mkdir()
    save_field(NeRFField(_default_field(), choose_hashgrid("torch", "cpu")), coarse)
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
        geometry={"steps": 4, "resolution": 24, "render_size": 32, "batch_size": 1},
        checkpoint_every=2,
    )
    ctx = _ctx(stage, params, {"coarse": coarse, "encode_prompt": ectx.out}, tmp_path / "mesh")
    stage.run(ctx)
    assert ctx.metrics["watertight"] and 0 < ctx.metrics["faces"] <= 1500
    assert {"geometry_losses.json", "geometry_loss_curve.png", "mesh.glb"} <= {p.name for p in ctx.out.iterdir()}
    assert "geometry_s" in ctx.timings
    # the untrained field is a grey ball (diameter ~0.43); 4 steps leave it a ball, which covers
    # a fraction of the red cube's silhouette (measured: IoU 0.153, colour error 0.267)
    radius = sum(ctx.metrics["extent"]) / 6
    assert ctx.metrics["volume"] == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.1)
    assert ctx.metrics["iou"] == pytest.approx(0.153, abs=0.02)
    assert ctx.metrics["color_err"] == pytest.approx(0.267, abs=0.02)
    # a checkpoint at step 2 resumes to the same result
    assert (ctx.checkpoint_dir / "state.json").exists()
    ctx_b = _ctx(stage, params, {"coarse": coarse, "encode_prompt": ectx.out}, tmp_path / "mesh_b")
    ctx_b.checkpoint_dir = ctx.checkpoint_dir
    stage.run(ctx_b)
    assert ctx_b.metrics["resumed_from"] == 2
    assert ctx_b.metrics["faces"] == ctx.metrics["faces"] and ctx_b.metrics["area"] == ctx.metrics["area"]


@pytest.mark.parametrize("clamped", [True, False])
def test_the_refined_surface_never_leaves_the_band(clamped):
    """GeometryTrainer keeps only tets near the initial surface. A correction big enough to push
    the surface past them would cut it open there (the cubes' edges did, after ~100 SDS steps);
    the clamp in current_sdf keeps every zero crossing inside the kept tets, for any correction."""
    from t3d.mesh.dmtet import GeometryParams, GeometryTrainer

    r = 24
    axis = np.linspace(-1, 1, r)
    dist = np.sqrt(sum(g**2 for g in np.meshgrid(axis, axis, axis, indexing="ij")))
    settings = GeometryParams(resolution=r, correction_resolution=6, band_voxels=4)
    trainer = GeometryTrainer(
        40.0 * (dist < 0.55), np.full(3, -1.0), np.full(3, 2.0 / (r - 1)), 1.0, None, None, None, None, settings,
        torch.Generator(), raster=TorchRaster("cpu"),
    )  # fmt: skip
    if not clamped:
        trainer.limit = float("inf")
    with torch.no_grad():  # a correction of up to +-0.5 world units (~6 voxels): far past the band
        trainer.delta.copy_(0.5 * torch.randn(trainer.delta.shape, generator=torch.Generator().manual_seed(0)))
    verts, faces = trainer.surface()
    mesh = trimesh.Trimesh(verts.numpy(), faces.numpy(), process=False)
    assert len(faces) > 500
    assert mesh.is_watertight == clamped  # without the clamp the same correction opens holes
