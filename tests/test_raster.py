"""The rasterizer (torch twin; nvdiffrast too where CUDA and the library exist) on hand-checked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from t3d.backends import BackendChoice
from t3d.render import raster as raster_impl
from t3d.render.cameras import camera_rays, make_cameras, projection_matrix
from t3d.render.raster import NvdiffrastRaster, RasterBackend, TorchRaster, choose_raster, render_mesh
from t3d.toy.world import sphere_disc_fraction

RASTER = TorchRaster("cpu")
TRI = torch.tensor([[0, 1, 2]], dtype=torch.int32)


def clip(*xyzw):
    return torch.tensor([list(p) for p in xyzw], dtype=torch.float32)[None]


def pixel_centres(h, w):
    """NDC of pixel centres, indexed [row, col] with row 0 at the bottom."""
    ys = (torch.arange(h) + 0.5) / h * 2 - 1
    xs = (torch.arange(w) + 0.5) / w * 2 - 1
    return torch.meshgrid(ys, xs, indexing="ij")


# ------------------------------------------------------------------------------ coverage


def test_coverage_of_lower_left_half():
    pos = clip((-1, -1, 0, 1), (1, -1, 0, 1), (-1, 1, 0, 1))
    rast, db = RASTER.rasterize(pos, TRI, (4, 4))
    assert rast.shape == (1, 4, 4, 4) and db is None
    covered = (rast[0, ..., 3] > 0).int()
    # pixel centres at +-0.25, +-0.75; covered iff x + y <= 0 (row 0 = y -0.75, the bottom)
    expected = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    assert torch.equal(covered, expected)
    assert torch.all(rast[0, ..., 3][covered > 0] == 1.0)
    assert torch.all(rast[0][covered == 0] == 0.0)  # empty pixels are zero in every channel


def test_coverage_matches_point_in_triangle_away_from_edges():
    h, w = 24, 32
    tri2d = np.array([[-0.7, -0.55], [0.8, -0.2], [-0.1, 0.9]])
    pos = clip(*[(x, y, 0.2, 1.0) for x, y in tri2d])
    rast, _ = RASTER.rasterize(pos, TRI, (h, w))
    gy, gx = pixel_centres(h, w)
    q = np.stack([gx.numpy(), gy.numpy()], -1)

    def edge(a, b):
        return (b[0] - a[0]) * (q[..., 1] - a[1]) - (b[1] - a[1]) * (q[..., 0] - a[0])

    e = np.stack([edge(tri2d[0], tri2d[1]), edge(tri2d[1], tri2d[2]), edge(tri2d[2], tri2d[0])])
    inside = (e > 0).all(0)
    clear = (np.abs(e) > 1e-6).all(0)
    got = rast[0, ..., 3].numpy() > 0
    assert inside.sum() > 100
    assert np.array_equal(got[clear], inside[clear])


def test_barycentrics_at_known_pixel():
    pos = clip((-1, -1, 0, 1), (1, -1, 0, 1), (-1, 1, 0, 1))
    rast, _ = RASTER.rasterize(pos, TRI, (4, 4))
    # pixel (row 0, col 0) centre (-0.75, -0.75): weights (0.75, 0.125, 0.125) for vertices 0, 1, 2
    assert torch.allclose(rast[0, 0, 0, :2], torch.tensor([0.75, 0.125]), atol=1e-6)
    # pixel (row 1, col 2) centre (0.25, -0.25): on the hypotenuse, u = 0
    assert torch.allclose(rast[0, 1, 2, :2], torch.tensor([0.0, 0.625]), atol=1e-6)


def test_perspective_correct_barycentrics_follow_the_ray():
    # a triangle tilted in depth, in camera space, projected with the OpenGL matrix
    cam = torch.tensor([[-0.6, -0.5, -1.5], [0.7, -0.4, -3.5], [0.0, 0.6, -2.5]])
    proj = projection_matrix(60.0, 0.1, 10.0)
    pos = (torch.cat([cam, torch.ones(3, 1)], -1) @ proj.T)[None]
    rast, _ = RASTER.rasterize(pos, TRI, (32, 32))
    out, _ = RASTER.interpolate(cam, rast, TRI)
    m = rast[0, ..., 3] > 0
    gy, gx = pixel_centres(32, 32)
    f = 1 / math.tan(math.radians(30))
    p = out[0][m]
    # the interpolated camera-space point projects back onto its own pixel centre
    assert torch.allclose(f * p[:, 0] / -p[:, 2], gx[m], atol=1e-4)
    assert torch.allclose(f * p[:, 1] / -p[:, 2], gy[m], atol=1e-4)
    # and z/w in rast is the projected depth of that point
    zw = (proj[2, 2] * p[:, 2] + proj[2, 3]) / -p[:, 2]
    assert torch.allclose(rast[0, ..., 2][m], zw, atol=1e-4)


# ------------------------------------------------------------------------------ depth, winding, clipping


@pytest.mark.parametrize("near_first", [True, False])
def test_nearer_triangle_wins(near_first):
    near = [(-0.9, -0.9, -0.5, 1), (0.9, -0.9, -0.5, 1), (0.0, 0.9, -0.5, 1)]
    far = [(-0.9, 0.9, 0.5, 1), (0.9, 0.9, 0.5, 1), (0.0, -0.9, 0.5, 1)]
    pos = clip(*(near + far if near_first else far + near))
    tri = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    rast, _ = RASTER.rasterize(pos, tri, (16, 16))
    near_id = 1 if near_first else 2
    # the centre is covered by both: the nearer (smaller z/w) one wins
    assert rast[0, 8, 8, 3].item() == near_id
    assert rast[0, 8, 8, 2].item() == pytest.approx(-0.5)
    # near the top only the far triangle is present (its base runs along the top)
    assert rast[0, 14, 8, 3].item() == 3 - near_id


def test_both_windings_rasterize():
    ccw = clip((-0.8, -0.8, 0, 1), (0.8, -0.8, 0, 1), (0, 0.8, 0, 1))
    cw = ccw[:, [0, 2, 1]]
    r1, _ = RASTER.rasterize(ccw, TRI, (16, 16))
    r2, _ = RASTER.rasterize(cw, TRI, (16, 16))
    assert (r1[..., 3] > 0).sum() > 50
    assert torch.equal(r1[..., 3] > 0, r2[..., 3] > 0)
    # same surface point, barycentrics permuted with the vertices
    m = r1[0, ..., 3] > 0
    assert torch.allclose(r1[0, ..., 0][m], r2[0, ..., 0][m], atol=1e-5)
    assert torch.allclose(r1[0, ..., 1][m], 1 - r2[0, ..., 0][m] - r2[0, ..., 1][m], atol=1e-5)


def test_behind_camera_and_beyond_far_are_clipped():
    behind = clip((-0.5, -0.5, 0, -1), (0.5, -0.5, 0, -1), (0, 0.5, 0, -1))
    rast, _ = RASTER.rasterize(behind, TRI, (8, 8))
    assert (rast[..., 3] == 0).all()
    beyond = clip((-0.9, -0.9, 1.5, 1), (0.9, -0.9, 1.5, 1), (0, 0.9, 1.5, 1))
    rast, _ = RASTER.rasterize(beyond, TRI, (8, 8))
    assert (rast[..., 3] == 0).all()
    # crossing the camera plane: only the part in front is drawn, and never a mirrored image
    cam = torch.tensor([[-0.3, -0.3, -1.0], [0.3, -0.3, -1.0], [0.0, 0.2, 1.0]])
    proj = projection_matrix(60.0, 0.1, 10.0)
    pos = (torch.cat([cam, torch.ones(3, 1)], -1) @ proj.T)[None]
    rast, _ = RASTER.rasterize(pos, TRI, (32, 32))
    m = rast[0, ..., 3] > 0
    assert m.any()
    out, _ = RASTER.interpolate(cam, rast, TRI)
    assert (out[0][m][:, 2] <= -0.1 + 1e-4).all()  # every drawn point is beyond the near plane


def test_batch_of_instances():
    a = clip((-1, -1, 0, 1), (1, -1, 0, 1), (-1, 1, 0, 1))
    b = a.clone()
    b[..., 0] *= -1  # mirrored: lower-right half
    rast, _ = RASTER.rasterize(torch.cat([a, b]), TRI, (4, 4))
    assert rast[0, 0, 0, 3] == 1 and rast[1, 0, 0, 3] == 1
    assert rast[0, 3, 0, 3] == 1 and rast[1, 3, 0, 3] == 0
    assert rast[1, 3, 3, 3] == 1


# ------------------------------------------------------------------------------ orientation


def test_raw_output_has_row_zero_at_the_bottom():
    top = clip((-0.5, 0.3, 0, 1), (0.5, 0.3, 0, 1), (0.0, 0.9, 0, 1))  # y > 0: top of clip space
    rast, _ = RASTER.rasterize(top, TRI, (16, 16))
    rows = (rast[0, ..., 3] > 0).any(-1).nonzero().squeeze(1)
    assert rows.min() >= 8  # the LAST rows of the tensor


def _ico(radius=0.6, subdivisions=3, offset=(0.0, 0.0, 0.0)):
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    v = torch.tensor(m.vertices + np.asarray(offset), dtype=torch.float32)
    return v, torch.tensor(m.faces, dtype=torch.int32)


def test_render_mesh_is_row_zero_at_top_and_matches_camera_rays():
    # a small sphere above the origin (world +z is up) must land in the FIRST rows
    v, f = _ico(0.25, 2, (0.0, 0.0, 0.45))
    cams = make_cameras([0.0, 90.0], [0.0, 0.0], 2.5, 40.0)
    out = render_mesh(v, f, cams, 32, raster=RASTER)
    rows = (out["mask"][0, ..., 0] > 0).any(-1).nonzero().squeeze(1)
    assert rows.max() < 16
    # every covered pixel's world point lies on that pixel's camera ray
    origins, dirs = camera_rays(cams, 32)
    m = out["mask"][..., 0] > 0
    to_pt = out["xyz"][m] - origins[m]
    along = (to_pt * dirs[m]).sum(-1, keepdim=True)
    assert (to_pt - along * dirs[m]).norm(dim=-1).max() < 1e-3
    # silhouette agrees with an analytic ray-sphere test (the mesh is a polygonal sphere, so allow the rim)
    c = torch.tensor([0.0, 0.0, 0.45])
    oc = origins - c
    bq = (oc * dirs).sum(-1)
    disc = bq**2 - ((oc * oc).sum(-1) - 0.25**2)
    analytic = disc > 0
    assert (analytic ^ m).float().mean() < 0.02


def test_render_mesh_outputs_and_texture_lookup():
    v, f = _ico(0.6, 2)
    cams = make_cameras([0.0], [10.0], 2.5, 40.0)
    uvs = torch.stack([0.5 + 0.4 * v[:, 0], 0.5 + 0.4 * v[:, 2]], -1)
    tex = torch.zeros(8, 8, 3)
    tex[..., 0] = 1.0  # plain red
    out = render_mesh(v, f, cams, 24, raster=RASTER, uvs=uvs, tex=tex, background=1.0, antialias_rgb=False)
    m = out["mask"][0, ..., 0] > 0
    assert set(out) >= {"mask", "xyz", "normal", "depth", "rgb", "uv", "rast"}
    assert torch.allclose(out["rgb"][0][m], torch.tensor([1.0, 0.0, 0.0]), atol=1e-5)
    assert torch.allclose(out["rgb"][0][~m], torch.ones(3))
    n = out["normal"][0][m]
    assert torch.allclose(n.norm(dim=-1), torch.ones(n.shape[0]), atol=1e-4)
    assert ((n * out["xyz"][0][m]).sum(-1) > 0).all()  # outward normals on the visible side
    d = out["depth"][0, 12, 12, 0]
    assert 1.8 < d.item() < 2.0  # the sphere's front at ~2.5 - 0.6
    # with antialiasing the rim blends towards the white background, the inside stays red
    aa = render_mesh(v, f, cams, 24, raster=RASTER, uvs=uvs, tex=tex, background=1.0)["rgb"][0]
    assert torch.equal(aa[12, 12], out["rgb"][0, 12, 12])
    assert ((aa[..., 1] > 0.01) & (aa[..., 1] < 0.99)).sum() > 10
    # end to end, gradients reach the vertices (shading and silhouettes) and the texture
    vg = v.clone().requires_grad_(True)
    tg = tex.clone().requires_grad_(True)
    img = render_mesh(vg, f, cams, 24, raster=RASTER, uvs=uvs, tex=tg, background=1.0)["rgb"]
    (img * torch.linspace(0, 1, 24)[None, None, :, None]).sum().backward()
    assert vg.grad.abs().sum() > 0 and tg.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ gradients


def test_interpolate_gradients_reach_attributes_and_positions():
    pos = clip((-0.8, -0.7, 0.1, 1.0), (0.9, -0.6, 0.2, 1.3), (0.0, 0.8, -0.1, 0.9)).requires_grad_(True)
    attr = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], requires_grad=True)
    rast, _ = RASTER.rasterize(pos, TRI, (16, 16))
    out, da = RASTER.interpolate(attr, rast, TRI)
    assert da is None and out.shape == (1, 16, 16, 2)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * w).sum().backward()
    assert attr.grad is not None and attr.grad.abs().sum() > 0
    assert pos.grad is not None and pos.grad[..., [0, 1, 3]].abs().sum() > 0


def test_barycentric_gradients_match_finite_differences():
    base = torch.tensor([[-0.8, -0.7, 0.1, 1.0], [0.9, -0.6, 0.2, 1.3], [0.0, 0.8, -0.1, 0.9]], dtype=torch.float64)[
        None
    ]
    attr = torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.5, 0.7]], dtype=torch.float64)

    def f(p):
        rast, _ = RASTER.rasterize(p, TRI, (8, 8))
        return RASTER.interpolate(attr, rast, TRI)[0]

    # small steps do not change coverage here (no pixel centre within 1e-6 of an edge)
    assert torch.autograd.gradcheck(f, (base.clone().requires_grad_(True),), eps=1e-7, atol=1e-5)


def test_vertex_attribute_broadcast_and_batch():
    pos = torch.cat([clip((-1, -1, 0, 1), (1, -1, 0, 1), (-1, 1, 0, 1))] * 2)
    rast, _ = RASTER.rasterize(pos, TRI, (4, 4))
    a2 = torch.tensor([[1.0], [2.0], [3.0]])
    o1, _ = RASTER.interpolate(a2, rast, TRI)
    o2, _ = RASTER.interpolate(a2[None], rast, TRI)
    o3, _ = RASTER.interpolate(torch.stack([a2, 2 * a2]), rast, TRI)
    assert torch.allclose(o1, o2)
    assert torch.allclose(o3[1], 2 * o1[1])
    # pixel (0,0): 0.75*1 + 0.125*2 + 0.125*3
    assert o1[0, 0, 0, 0].item() == pytest.approx(1.375)
    assert o1[0, 3, 3, 0].item() == 0.0


# ------------------------------------------------------------------------------ texture


def tex2x2():
    # row 0 is the bottom (t = 0): a b / c d with a at (s, t) = (0.25, 0.25)
    return torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]])[None]  # [1,2,2,1]


def sample(tex, uvs, **kw):
    uv = torch.tensor(uvs, dtype=torch.float32).reshape(1, 1, -1, 2)
    return RASTER.texture(tex, uv, **kw)[0, 0, :, 0]


def test_texture_bilinear_on_2x2():
    t = tex2x2()
    got = sample(t, [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75], [0.5, 0.25], [0.5, 0.5], [0.25, 0.5]])
    assert torch.allclose(got, torch.tensor([1.0, 2.0, 3.0, 4.0, 1.5, 2.5, 2.0]))
    # wrap: s = 0 sits between the last column and the first
    assert sample(t, [[0.0, 0.25]], boundary_mode="wrap").item() == pytest.approx(1.5)
    assert sample(t, [[1.0, 0.75]], boundary_mode="wrap").item() == pytest.approx(3.5)
    # clamp: to the centres of the boundary texels
    assert sample(t, [[0.0, 0.25]], boundary_mode="clamp").item() == pytest.approx(1.0)
    assert sample(t, [[1.0, 1.0]], boundary_mode="clamp").item() == pytest.approx(4.0)
    # zero: outside is zero
    assert sample(t, [[0.0, 0.25]], boundary_mode="zero").item() == pytest.approx(0.5)
    # nearest
    assert sample(t, [[0.6, 0.9]], filter_mode="nearest").item() == pytest.approx(4.0)


def test_texture_gradients_reach_texture_and_uv():
    t = tex2x2().clone().requires_grad_(True)
    uv = torch.tensor([[[[0.5, 0.5]]]], requires_grad=True)
    RASTER.texture(t, uv, filter_mode="linear").sum().backward()
    assert torch.allclose(t.grad, torch.full_like(t, 0.25))
    # d/ds of the bilinear blend at the centre: ((2 + 4) - (1 + 3)) / 2 * Wt
    assert uv.grad[0, 0, 0, 0].item() == pytest.approx(2.0)
    assert uv.grad[0, 0, 0, 1].item() == pytest.approx(4.0)

    tex = torch.rand(2, 5, 7, 3, dtype=torch.float64, requires_grad=True)
    uvg = (torch.rand(2, 3, 4, 2, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: RASTER.texture(a, b, boundary_mode="clamp"), (tex, uvg), eps=1e-6, atol=1e-5
    )


def test_texture_minibatch_broadcast():
    t = tex2x2()
    uv = torch.full((3, 2, 2, 2), 0.25)
    out = RASTER.texture(t, uv)
    assert out.shape == (3, 2, 2, 1) and torch.allclose(out, torch.ones_like(out))


# ------------------------------------------------------------------------------ antialias and backends


def _scaled_triangle(scale, res=32):
    base = torch.tensor([[-0.6, -0.5, 0, 1], [0.7, -0.3, 0, 1], [-0.1, 0.6, 0, 1]], dtype=torch.float64)
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    pos = torch.cat([base[:, :2] * s, base[:, 2:]], -1)[None]
    rast, _ = RASTER.rasterize(pos, TRI, (res, res))
    return s, pos, rast


def test_antialias_coverage_and_position_gradient():
    res = 32
    s, pos, rast = _scaled_triangle(1.0, res)
    mask = (rast[..., 3:] > 0).double()
    aa = RASTER.antialias(mask, rast, pos, TRI)
    x = torch.tensor([[-0.6, -0.5], [0.7, -0.3], [-0.1, 0.6]], dtype=torch.float64)
    area = (
        0.5
        * abs(float((x[1, 0] - x[0, 0]) * (x[2, 1] - x[0, 1]) - (x[2, 0] - x[0, 0]) * (x[1, 1] - x[0, 1])))
        * (res / 2) ** 2
    )
    # antialiased coverage integrates the triangle's area better than point sampling
    assert abs(aa.sum().item() - area) < 0.5 * abs(mask.sum().item() - area) + 0.2
    assert ((aa >= 0) & (aa <= 1)).all()
    # and its derivative w.r.t. a uniform scale is d(area)/ds = 2 * area / s, within 10 %
    aa.sum().backward()
    assert s.grad.item() == pytest.approx(2 * area, rel=0.1)
    # far from the edges nothing changes
    assert aa[0, 0, 0, 0] == 0 and aa[0, 12, 12, 0] == 1


def test_antialias_leaves_interior_edges_alone_and_handles_occlusion():
    # a quad of two front-facing triangles: their shared diagonal is not a silhouette
    pos = clip((-0.7, -0.7, 0, 1), (0.7, -0.7, 0, 1), (0.7, 0.7, 0, 1), (-0.7, 0.7, 0, 1))
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)
    rast, _ = RASTER.rasterize(pos, tri, (16, 16))
    color = (rast[..., 3:] == 1).float()  # a colour step along the diagonal
    aa = RASTER.antialias(color, rast, pos, tri)
    inner = slice(3, 13)
    assert torch.equal(aa[0, inner, inner], color[0, inner, inner])
    # a nearer triangle over a farther one: its border against the far surface is blended
    pos = clip(
        (-0.9, -0.9, 0.5, 1),
        (0.9, -0.9, 0.5, 1),
        (0.9, 0.9, 0.5, 1),
        (-0.9, 0.9, 0.5, 1),
        (-0.43, -0.37, -0.5, 1),
        (0.41, -0.33, -0.5, 1),
        (0.03, 0.47, -0.5, 1),
    )
    tri = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6]], dtype=torch.int32)
    rast, _ = RASTER.rasterize(pos, tri, (16, 16))
    color = (rast[..., 3:] == 3).float()
    aa = RASTER.antialias(color, rast, pos, tri)
    changed = (aa != color)[0, ..., 0]
    assert changed.sum() >= 4
    assert ((aa > 0) & (aa < 1)).sum() >= 4


def test_backend_switch_on_cpu():
    auto = choose_raster("auto", "cpu")
    assert isinstance(auto, TorchRaster) and auto.choice == BackendChoice("nvdiffrast", "torch", "device is cpu")
    assert choose_raster("auto", "cpu") is auto  # one object per (request, device): chosen once
    assert choose_raster("torch", "cpu").choice.reason == "requested"
    with pytest.raises(RuntimeError, match="needs CUDA"):
        choose_raster("nvdiffrast", "cpu")
    with pytest.raises(ValueError, match="auto, nvdiffrast or torch"):
        choose_raster("cuda-library", "cpu")  # the old request word is no longer understood


def test_every_rasterizing_function_requires_the_backend():
    """No default stands for the torch twin: leaving the backend out is an error, never a silent choice."""
    import inspect

    from t3d.mesh.dmtet import GeometryTrainer, render_shaded
    from t3d.mesh.export import bake_texture, turntable
    from t3d.render.textured import render_lit_textured
    from t3d.toy.metrics import evaluate_mesh, render_textured_mesh

    for fn in (
        render_mesh,
        render_lit_textured,
        render_shaded,
        GeometryTrainer,
        bake_texture,
        turntable,
        render_textured_mesh,
        evaluate_mesh,
    ):
        param = inspect.signature(fn).parameters["raster"]
        assert param.default is inspect.Parameter.empty, fn.__name__
    with pytest.raises(TypeError):
        render_mesh(*_ico(0.5, 1), make_cameras([0.0], [0.0], 2.5, 40.0), 8)
    with pytest.raises(TypeError):
        RasterBackend("cpu", BackendChoice("x", "torch", "test"))  # the interface itself rasterizes nothing


def test_torch_twin_10k_faces_128():
    """A 10k-face mesh at 128 px covers the expected disc. Its speed is bench/raster.py's to report:
    a timed assertion fails on a busy shared machine and passes a slow rasterizer on an idle one."""
    import trimesh

    m = trimesh.creation.uv_sphere(radius=0.7, count=[51, 51])  # 10,400 faces
    v = torch.tensor(m.vertices, dtype=torch.float32)
    f = torch.tensor(m.faces, dtype=torch.int32)
    cams = make_cameras([30.0], [20.0], 2.5, 40.0)
    out = render_mesh(v, f, cams, 128, raster=RASTER)
    covered = out["mask"].sum().item() / 128**2
    assert covered == pytest.approx(sphere_disc_fraction(0.7, 2.5, 40.0), rel=0.03)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvdiffrast_agrees_with_torch_twin():
    pytest.importorskip("nvdiffrast.torch")
    raster = choose_raster("auto", "cuda")
    if not isinstance(raster, NvdiffrastRaster):
        pytest.skip(f"nvdiffrast unusable here: {raster.choice.reason}")
    v, f = _ico(0.6, 4)
    cams = make_cameras([0.0, 120.0], [15.0, 30.0], 2.5, 40.0)
    a = render_mesh(v.cuda(), f.cuda(), cams, 128, raster=raster)
    b = render_mesh(v.cuda(), f.cuda(), cams, 128, raster=TorchRaster("cuda"))
    diff = (a["rast"][..., 3] != b["rast"][..., 3]).float().mean().item()
    assert diff < 0.02
    both = (a["mask"][..., 0] > 0) & (b["mask"][..., 0] > 0)
    assert torch.allclose(a["xyz"][both], b["xyz"][both], atol=2e-2)


def test_facing_determinant_equals_the_edge_coefficients_one():
    """The silhouette test computes only the determinant of _edge_coefficients, bit for bit the same,
    and still finds silhouettes (some edges, not all) on closed and open meshes."""
    from t3d.render.cameras import make_cameras
    from t3d.render.raster import mvp_matrices

    v, f = _ico(subdivisions=2)
    cams = make_cameras([30.0, 200.0], [20.0, -10.0], 2.5, 40.0)
    mvp = mvp_matrices(cams)
    f = f.long()
    for faces in (f, f[:-7]):  # a closed mesh, and one with a hole (border edges)
        for shift in (0.0, 0.05):
            vv = v + shift
            pos = torch.einsum("bij,vj->bvi", mvp, torch.cat([vv, torch.ones_like(vv[:, :1])], -1))
            _, d = raster_impl._edge_coefficients(pos[:, faces][..., [0, 1, 3]])
            assert torch.equal(raster_impl._facing_determinant(pos, faces), d)
            sil, _ = raster_impl._silhouette_edges(pos, faces)
            assert sil.any() and not sil.all()
