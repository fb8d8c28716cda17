import colorsys
import time

import pytest
import torch

from t3d.render.cameras import CameraParams, make_cameras, orbit_cameras, sample_cameras
from t3d.toy.world import (
    COLOURS,
    SHAPES,
    SPHERE_RADIUS,
    parse_prompt,
    render_primitive,
    sdf,
    sphere_disc_fraction,
    split_view,
    toy_prompts,
    toy_prompts_with_views,
)


def test_world_size():
    assert len(SHAPES) >= 5 and {"cube", "sphere", "cone", "cylinder", "torus"} <= set(SHAPES)
    assert len(COLOURS) >= 4
    prompts = toy_prompts()
    assert len(prompts) == len(set(prompts)) == len(SHAPES) * len(COLOURS)
    assert "a red cube" in prompts
    assert len(toy_prompts_with_views()) == 4 * len(prompts)


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("a red cube", ("cube", "red")),
        ("A Blue Sphere, side view", ("sphere", "blue")),
        ("an yellow torus, overhead view", ("torus", "yellow")),
        ("green cone , back view", ("cone", "green")),
        ("a red cylinder, front view", ("cylinder", "red")),
    ],
)
def test_parse_prompt(prompt, expected):
    assert parse_prompt(prompt) == expected


def test_parse_prompt_rejects_non_toy():
    for bad in ["a purple cube", "a red teapot", "", "a red blue cube"]:
        with pytest.raises(ValueError):
            parse_prompt(bad)


def test_split_view():
    assert split_view("a red cube, side view") == ("a red cube", "side")
    assert split_view("a red cube") == ("a red cube", None)


def test_sdf_signs():
    origin = torch.zeros(1, 3)
    far = torch.tensor([[0.0, 0.0, 0.9], [0.9, 0.0, 0.0], [0.0, -0.9, 0.3]])
    for shape in SHAPES:
        if shape != "torus":
            assert sdf(shape, origin).item() < 0, shape
        assert (sdf(shape, far) > 0).all(), shape
    assert sdf("torus", torch.tensor([[0.5, 0.0, 0.0]])).item() < 0  # inside the tube
    assert sdf("torus", origin).item() > 0  # the hole
    # Exact distance for the sphere and the cube face.
    assert sdf("sphere", torch.tensor([[1.0, 0, 0]])).item() == pytest.approx(1.0 - SPHERE_RADIUS)


def test_everything_fits_in_view():
    cams = sample_cameras(CameraParams(), 32, torch.Generator().manual_seed(0))
    for shape in SHAPES:
        _, mask = render_primitive(shape, "red", cams, 32)
        border = torch.cat([mask[..., 0, :], mask[..., -1, :], mask[..., :, 0], mask[..., :, -1]], -1)
        assert border.sum() == 0, f"{shape} touches the image border"
        assert (mask.flatten(1).sum(1) > 20).all(), f"{shape} is too small or missing"


def test_sphere_silhouette_matches_analytic_disc():
    p = CameraParams()
    cams = orbit_cameras(p, 4, elevation_deg=20)
    _, mask = render_primitive("sphere", "blue", cams, 128)
    expected = sphere_disc_fraction(SPHERE_RADIUS, p.radius, p.fov_deg)
    assert mask.mean(dim=(1, 2, 3)).tolist() == pytest.approx([expected] * 4, rel=0.03)


@pytest.mark.parametrize("colour", list(COLOURS))
def test_foreground_colour_and_white_background(colour):
    cams = sample_cameras(CameraParams(), 8, torch.Generator().manual_seed(1))
    rgb, mask = render_primitive("cube", colour, cams, 32)
    assert rgb.shape == (8, 3, 32, 32) and mask.shape == (8, 1, 32, 32)
    bg = (mask == 0).expand_as(rgb)
    assert torch.allclose(rgb[bg], torch.ones(()))
    fg = rgb.permute(0, 2, 3, 1)[mask[:, 0] > 0]
    # Every lit pixel has the prompted hue (shading only scales brightness).
    target_hue = colorsys.rgb_to_hsv(*COLOURS[colour])[0]
    hues = torch.tensor([colorsys.rgb_to_hsv(*px.tolist())[0] for px in fg[:: max(1, len(fg) // 200)]])
    d = (hues - target_hue).abs()
    assert torch.minimum(d, 1 - d).max() < 0.02
    # Lambertian + ambient: never darker than ambient, brighter where lit.
    ratio = fg / torch.tensor(COLOURS[colour])
    assert ratio.min() > 0.34 and ratio.max() <= 1.0 + 1e-5 and ratio.max() > 0.8


def test_cone_points_up():
    cams = make_cameras([0.0], [0.0], 2.5, 40.0)
    _, mask = render_primitive("cone", "red", cams, 64)
    rows = mask[0, 0].sum(1)
    filled = rows.nonzero().flatten()
    top, bottom = rows[filled[0] : filled[0] + 5].mean(), rows[filled[-1] - 5 : filled[-1]].mean()
    assert top < bottom  # row 0 is the top of the image


def test_supersampling_gives_soft_edges():
    cams = orbit_cameras(CameraParams(), 2)
    _, hard = render_primitive("sphere", "red", cams, 32)
    _, soft = render_primitive("sphere", "red", cams, 32, supersample=2)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert ((soft > 0) & (soft < 1)).any()
    assert soft.mean().item() == pytest.approx(hard.mean().item(), rel=0.05)


def test_render_speed():
    cams = sample_cameras(CameraParams(), 64, torch.Generator().manual_seed(0))
    render_primitive("torus", "red", cams, 16)  # warm up
    t = time.perf_counter()
    render_primitive("torus", "green", cams, 64)
    assert time.perf_counter() - t < 3.0  # ~0.1 s on an idle 2-core machine
