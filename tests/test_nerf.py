"""NeRFField and the volume renderer: shapes, bounds, normals, gradients, image orientation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from t3d.fields.nerf import FieldParams, NeRFField
from t3d.render.cameras import CameraParams, make_cameras, sample_cameras
from t3d.render.volume import light_directions, ray_sphere, render
from t3d.toy.world import sphere_disc_fraction
from tests.grids import CPU_GRID, SMALL_GRID


class SphereField(torch.nn.Module):
    """Analytic field: a solid ball of constant density and colour (the renderer's test double)."""

    def __init__(self, centre=(0.0, 0.0, 0.0), radius=0.5, sigma=200.0, colour=(0.9, 0.1, 0.1), bound=1.0):
        super().__init__()
        self.params = SimpleNamespace(bound=bound)
        self.centre = torch.tensor(centre)
        self.radius, self.sigma = radius, sigma
        self.colour = torch.tensor(colour)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    @property
    def device(self):
        return self.dummy.device

    def _sdf(self, p):
        return (p - self.centre).norm(dim=-1) - self.radius

    def query(self, p):
        raw = -self._sdf(p) * 50
        density = (self._sdf(p) < 0).float() * self.sigma
        return density, self.colour.expand(p.shape[0], 3), raw

    def normals(self, p, raw=None):
        return F.normalize(p - self.centre, dim=-1)

    def background(self, dirs):
        return torch.ones_like(dirs)


def _front_camera(el=0.0):
    p = CameraParams()
    return make_cameras([0.0], [el], p.radius, p.fov_deg)


def test_sphere_render_opacity_disc_and_fraction():
    field = SphereField(radius=0.5)
    out = render(field, _front_camera(), 48, n_samples=96)
    op = out["opacity"][0, 0]
    assert out["rgb"].shape == (1, 3, 48, 48) and op.shape == (48, 48)
    assert op[24, 24] > 0.99 and op[0, 0] < 1e-3 and op[24, 0] < 1e-3
    expected = sphere_disc_fraction(0.5, CameraParams().radius, CameraParams().fov_deg)
    assert (op > 0.5).float().mean().item() == pytest.approx(expected, abs=0.02)
    # Inside the disc the colour is the ball's; outside it is the white background.
    torch.testing.assert_close(out["rgb"][0, :, 24, 24], torch.tensor([0.9, 0.1, 0.1]), atol=1e-3, rtol=0)
    torch.testing.assert_close(out["rgb"][0, :, 1, 1], torch.ones(3), atol=1e-3, rtol=0)
    # Depth at the centre is camera distance minus radius.
    assert out["depth"][0, 0, 24, 24].item() == pytest.approx(CameraParams().radius - 0.5, abs=0.03)


def test_image_orientation_up_is_top_rows():
    size = 32
    up = render(SphereField(centre=(0.0, 0.0, 0.45), radius=0.3), _front_camera(), size, n_samples=64)["opacity"][0, 0]
    rows = torch.arange(size, dtype=torch.float32)
    centroid_row = (up.sum(1) * rows).sum() / up.sum()
    assert centroid_row < size / 2 - 4, "an object at +z must appear in the top rows"
    # The camera at azimuth 0 looks down -x; its right is forward x up = (-1,0,0) x (0,0,1) = +y.
    side = render(SphereField(centre=(0.0, 0.45, 0.0), radius=0.3), _front_camera(), size, n_samples=64)["opacity"][
        0, 0
    ]
    cols = torch.arange(size, dtype=torch.float32)
    centroid_col = (side.sum(0) * cols).sum() / side.sum()
    assert centroid_col > size / 2 + 4


def test_lambertian_shading_and_normals():
    field = SphereField(radius=0.5, colour=(1.0, 1.0, 1.0))
    out = render(
        field,
        _front_camera(),
        32,
        n_samples=64,
        shading="lambertian",
        light_dir=(0.0, 0.0, 1.0),
        ambient=0.2,
        background="black",
    )
    rgb = out["rgb"][0, 0]
    assert rgb[16, 16] > 0.95  # facing the light (which sits at the camera)
    assert out["opacity"][0, 0, 16, 9] > 0.99 and out["opacity"][0, 0, 16, 3] < 1e-3  # disc is ~9 px in radius
    assert 0.2 <= rgb[16, 9] < rgb[16, 12] < rgb[16, 16]  # darker towards the limb
    n = out["normal"][0, :, 16, 16]
    torch.testing.assert_close(n / n.norm(), torch.tensor([1.0, 0.0, 0.0]), atol=0.05, rtol=0)
    # Per-sample mode gives the same picture.
    out_s = render(
        field,
        _front_camera(),
        32,
        n_samples=64,
        shading="lambertian",
        light_dir=(0.0, 0.0, 1.0),
        ambient=0.2,
        background="black",
        normal_mode="sample",
    )
    assert (out_s["rgb"] - out["rgb"]).abs().mean() < 0.02
    # Outward normals facing the camera: no orientation penalty.
    assert out["orientation"].abs().max() < 1e-6


def test_light_directions_follow_the_camera():
    cams = make_cameras([0.0, 90.0], [0.0, 0.0], 2.5, 40.0)
    light = light_directions(cams, (0.0, 0.0, 1.0))
    torch.testing.assert_close(light, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), atol=1e-5, rtol=0)
    lw = light_directions(cams, (0.0, 0.0, 1.0), light_frame="world")
    torch.testing.assert_close(lw, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]), atol=1e-5, rtol=0)


def test_ray_sphere_intersection():
    o = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 2.0]])
    d = torch.tensor([[-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    near, far, hit = ray_sphere(o, d, 1.0)
    assert hit.tolist() == [True, False]
    assert near[0].item() == pytest.approx(1.0) and far[0].item() == pytest.approx(3.0)


def test_field_shapes_bounds_and_blob():
    field = NeRFField(FieldParams(grid=SMALL_GRID, bound=1.0), CPU_GRID)
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.2, -0.1], [0.0, 0.0, 1.2], [2.0, 2.0, 2.0]])
    density, albedo = field(pts)
    assert density.shape == (4,) and albedo.shape == (4, 3)
    assert (density >= 0).all() and ((albedo >= 0) & (albedo <= 1)).all()
    assert density[0] > density[1] > 0, "the blob is densest at the centre"
    assert density[2] == 0 and density[3] == 0, "nothing exists outside the bounding sphere"
    torch.testing.assert_close(field.density(pts), density)
    assert field.backend.backend == "torch"


@pytest.mark.parametrize("method", ["central", "forward"])
def test_initial_normals_point_outwards(method):
    field = NeRFField(
        FieldParams(grid=SMALL_GRID, normal_method=method, blob="dreamfusion", density_activation="trunc_exp"),
        CPU_GRID,
    )
    gen = torch.Generator().manual_seed(0)
    dirs = F.normalize(torch.randn(64, 3, generator=gen), dim=-1)
    pts = dirs * (0.2 + 0.6 * torch.rand(64, 1, generator=gen))
    n = field.normals(pts)
    assert (n * dirs).sum(-1).min() > 0.9


def test_gradients_reach_grid_and_mlp_through_render():
    field = NeRFField(FieldParams(grid=SMALL_GRID), CPU_GRID)
    cams = sample_cameras(CameraParams(), 2, torch.Generator().manual_seed(0))
    out = render(
        field, cams, 16, n_samples=24, shading="lambertian", perturb=True, generator=torch.Generator().manual_seed(1)
    )
    loss = (out["rgb"] - 0.3).square().mean() + out["opacity"].mean()
    loss.backward()
    assert field.encoding.params.grad is not None and field.encoding.params.grad.abs().sum() > 0
    for p in field.mlp.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert field.mlp[0].weight.grad.abs().sum() > 0


def test_learned_background_and_empty_field():
    field = NeRFField(FieldParams(grid=SMALL_GRID, background="learned", blob="none", density_shift=-20.0), CPU_GRID)
    out = render(field, _front_camera(), 8, n_samples=8)
    assert out["opacity"].max() < 1e-3
    bg = field.background(torch.tensor([[1.0, 0.0, 0.0]]))
    assert ((bg > 0) & (bg < 1)).all()
    out["rgb"].mean().backward()
    assert field.bg_mlp[0].weight.grad is not None
    white = render(field, _front_camera(), 8, n_samples=8, background="white")
    torch.testing.assert_close(white["rgb"], torch.ones_like(white["rgb"]), atol=1e-3, rtol=0)


def test_state_dict_round_trip_and_config():
    a = NeRFField(FieldParams(grid=SMALL_GRID), CPU_GRID, seed=1)
    b = NeRFField(FieldParams.model_validate(a.config_dict()), CPU_GRID)
    b.load_state_dict(a.state_dict())
    pts = torch.rand(32, 3) - 0.5
    torch.testing.assert_close(a(pts)[0], b(pts)[0])
    assert "encoding.params" in a.state_dict()


def test_render_is_deterministic_without_perturb_and_chunks_agree():
    field = NeRFField(FieldParams(grid=SMALL_GRID), CPU_GRID)
    cams = sample_cameras(CameraParams(), 2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = render(field, cams, 16, n_samples=16, shading="lambertian")
        b = render(field, cams, 16, n_samples=16, shading="lambertian", chunk_rays=100)
    for k in ("rgb", "opacity", "depth", "normal"):
        torch.testing.assert_close(a[k], b[k])
    assert math.isfinite(a["depth"].sum().item())
