import colorsys

import pytest
import torch

from t3d.render.cameras import CameraParams, make_cameras, orbit_cameras, sample_cameras
from t3d.toy.metrics import canonical_cameras, janus_readout, mark_visible, score_against_truth
from t3d.toy.world import (
    COLOURS,
    MARK_WORDS,
    SHAPES,
    SPHERE_RADIUS,
    marked_prompts,
    parse_prompt,
    parse_toy_prompt,
    render_primitive,
    sdf,
    sphere_disc_fraction,
    split_view,
    toy_prompts,
    toy_prompts_with_views,
    underspecified_prompts,
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


# ---- toy world v2: objects with a front, under-specified prompts --------------------------------


@pytest.mark.parametrize(
    "prompt,shape,colour,mark,view,n_modes",
    [
        ("a red cube with a black spot, front view", "cube", "red", True, "front", 1),
        ("a cube", "cube", None, False, None, 4),
        ("A Blue Object, back view", None, "blue", False, "back", 5),
        ("a torus with a black spot", "torus", None, True, None, 4),
    ],
)
def test_parse_toy_prompt(prompt, shape, colour, mark, view, n_modes):
    toy = parse_toy_prompt(prompt)
    assert (toy.shape, toy.colour, toy.mark, toy.view) == (shape, colour, mark, view)
    assert len(toy.modes) == n_modes
    assert parse_toy_prompt(toy.text()) == toy  # the canonical text parses back


def test_parse_toy_prompt_rejects():
    for bad in ["an object", "a red cube object", "a red", "a black spot", "a purple cube"]:
        with pytest.raises(ValueError):
            parse_toy_prompt(bad)
    with pytest.raises(ValueError, match="several modes"):
        parse_prompt("a cube")  # the fully specified parser refuses a prompt with modes


def test_world_v2_prompt_lists():
    assert len(marked_prompts()) == len(toy_prompts()) and all(p.endswith(MARK_WORDS) for p in marked_prompts())
    under = underspecified_prompts()
    assert len(under) == len(SHAPES) + len(COLOURS)
    assert all(not parse_toy_prompt(p).fully_specified for p in under)


def test_spot_shows_from_the_front_only():
    """The true marked object is never Janus; an unmarked one reads as 'no spot at the front'."""
    cams = canonical_cameras(CameraParams())
    for shape in SHAPES:
        marked, _ = render_primitive(shape, "blue", cams, 32, supersample=2, mark=True)
        readout = janus_readout(marked)
        assert readout["mark_sides"] == ["front"] and not readout["janus"], (shape, readout)
        plain, _ = render_primitive(shape, "blue", cams, 32, supersample=2)
        assert not mark_visible(plain).any() and janus_readout(plain)["janus"]
    # A spot painted on every side (the Janus failure) is caught: the back view shows one too.
    back = make_cameras([180.0], [15.0], 2.5, 40.0)
    rgb, _ = render_primitive("sphere", "red", back, 32, supersample=2, mark=True)
    assert not mark_visible(rgb).any()


def test_underspecified_prompt_scores_against_its_nearest_mode():
    cams = orbit_cameras(CameraParams(), 4)
    rgb, mask = render_primitive("cube", "green", cams, 32)
    result = score_against_truth(rgb, mask, parse_toy_prompt("a cube"), cams, 32)
    assert result["mode"] == "green cube" and result["iou"] == 1.0 and result["color_err"] < 1e-6
    rgb, mask = render_primitive("torus", "red", cams, 32)
    result = score_against_truth(rgb, mask, parse_toy_prompt("a red object"), cams, 32)
    assert result["mode"] == "red torus" and result["iou"] == 1.0
    # A marked prompt's truth has the spot: the plain object scores a colour error against it.
    rgb, mask = render_primitive("sphere", "red", cams, 32)
    plain = score_against_truth(rgb, mask, parse_toy_prompt("a red sphere"), cams, 32)
    marked = score_against_truth(rgb, mask, parse_toy_prompt("a red sphere with a black spot"), cams, 32)
    assert plain["color_err"] < 1e-6 < marked["color_err"]
