"""Best-of-N scoring (t3d.mesh.selection): deterministic, prompt-sensitive on the toy prior, ranking."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from t3d.mesh.export import TexturedMesh, export_glb
from t3d.mesh.selection import DEFAULT_TIMESTEPS, SeedScore, rank_seeds, score_result
from t3d.render.cameras import CameraParams
from t3d.render.raster import choose_raster
from t3d.toy import world

QUICK = {"n_views": 4, "n_noise": 1}  # front, side, back, side; a quarter of the default's UNet work


def uniform_mesh(mesh: trimesh.Trimesh, colour: str) -> TexturedMesh:
    """A mesh painted one toy colour: a 4x4 texture of it, every UV at its centre."""
    rgb = np.round(np.array(world.COLOURS[colour]) * 255).astype(np.uint8)
    texture = np.broadcast_to(rgb, (4, 4, 3)).copy()
    return TexturedMesh(mesh.vertices, mesh.faces, np.full((len(mesh.vertices), 2), 0.5), texture)


@pytest.fixture(scope="module")
def glbs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("glbs")
    box = trimesh.creation.box(extents=[2 * world.CUBE_HALF] * 3)
    box.unmerge_vertices()  # one normal per face: flat-shaded like the toy world's cube
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=world.SPHERE_RADIUS)
    return {
        "red cube": export_glb(folder / "red_cube.glb", uniform_mesh(box, "red")),
        "blue sphere": export_glb(folder / "blue_sphere.glb", uniform_mesh(sphere, "blue")),
    }


@pytest.fixture(scope="module")
def score():
    from t3d.priors import load_prior

    prior = load_prior("embedded")
    raster = choose_raster("torch", "cpu")
    return lambda glb, prompt, **kw: score_result(prior, glb, prompt, CameraParams(), raster=raster, **kw)


def test_same_file_same_score(score, glbs):
    first, second = (score(glbs["red cube"], "a red cube", **QUICK) for _ in range(2))
    assert first == second
    assert first.n_evals == 4 * len(DEFAULT_TIMESTEPS) * 1  # views x timesteps x noises
    assert first.score == pytest.approx(first.err_uncond - first.err_cond, abs=1e-6)
    assert score(glbs["red cube"], "a red cube", seed=1, **QUICK) != first  # the seed picks the noise


def test_the_prompt_prefers_its_own_object(score, glbs):
    for prompt, right, wrong in (
        ("a red cube", "red cube", "blue sphere"),
        ("a blue sphere", "blue sphere", "red cube"),
    ):
        s_right, s_wrong = (score(glbs[k], prompt, **QUICK) for k in (right, wrong))
        assert s_right.score > 0 > s_wrong.score, (prompt, s_right, s_wrong)
        assert s_right.err_cond < s_wrong.err_cond


def test_rank_seeds_best_first_ties_to_lower_seed():
    scores = {seed: SeedScore(value, 0.0, 0.0, 1) for seed, value in {3: 0.5, 1: 0.5, 2: 0.9, 0: -0.1}.items()}
    assert rank_seeds(scores) == [2, 1, 3, 0]
    assert rank_seeds({}) == []
