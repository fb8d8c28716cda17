"""Perp-Neg's algebra and weights, its wiring into coarse/refine, and the ablation switches
(SDS without the noise baseline, SJC without perturbation, VSD's LoRA prompt)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import trimesh

from t3d.guidance.perp_neg import (
    PerpNegTerms,
    perp_neg_combine,
    perp_neg_embeddings,
    perp_neg_weights,
    perpendicular_component,
    predict_noise_perp_neg,
)
from t3d.guidance.sds import sds_loss, sjc_loss
from t3d.guidance.vsd import make_lora_unet, vsd_loss
from t3d.priors import build_tiny_prior
from t3d.render.cameras import CameraParams
from t3d.render.raster import choose_raster
from t3d.stages.coarse import CoarseParams, CoarseTrainer
from t3d.stages.encode_prompt import PromptEmbeddings
from t3d.stages.refine import RefineParams
from t3d.stages.texture import TextureParams, TextureTrainer
from tests.grids import CPU_GRID
from tests.test_recovery import _small_field
from tests.test_vsd import _setup, _trainer

E = math.exp(-0.5)


@pytest.fixture(scope="module")
def tiny():
    prior = build_tiny_prior("pixel", seed=0, image_size=16)
    texts = ["a red cube", "", *(f"a red cube, {v} view" for v in ("front", "side", "back", "overhead"))]
    e = prior.encode_text(texts).float()
    views = {"front": e[2:3], "side": e[3:4], "back": e[4:5], "overhead": e[5:6]}
    return prior, PromptEmbeddings(e[0:1], e[1:2], views, {})


# ---- the algebra -----------------------------------------------------------------------------
def test_perpendicular_component_is_orthogonal_per_image_and_zero_when_parallel():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    a[1] = -2.5 * b[1]  # image 1's negative is parallel to its positive
    perp = perpendicular_component(a, b)
    dots = (perp * b).sum((1, 2, 3))
    torch.testing.assert_close(dots, torch.zeros(3), atol=1e-4, rtol=0)
    assert perp[1].abs().max() < 1e-5
    assert perp[0].norm() > 0.5 * a[0].norm()  # random directions in 100 dims: mostly perpendicular
    # a - perp is along b: the projection coefficient of image 0 is <a,b>/<b,b>
    coeff = (a[0] * b[0]).sum() / (b[0] * b[0]).sum()
    torch.testing.assert_close(a[0] - perp[0], coeff * b[0], atol=1e-5, rtol=1e-5)


def test_zero_weights_is_plain_cfg_and_an_orthogonal_negative_is_subtracted_whole():
    gen = torch.Generator().manual_seed(1)
    eps_u, eps_c = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    negs = torch.randn(2, 2, 3, 4, 4, generator=gen)
    cfg = eps_u + 7.5 * (eps_c - eps_u)
    torch.testing.assert_close(perp_neg_combine(eps_u, eps_c, negs, torch.zeros(2, 2), 7.5), cfg)
    # e_pos lives on channel 0, e_neg on channel 1: orthogonal, so Perp-Neg subtracts s * w * e_neg exactly
    e_pos, e_neg = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    e_pos[:, 0] = torch.randn(2, 4, 4, generator=gen)
    e_neg[:, 1] = torch.randn(2, 4, 4, generator=gen)
    w = torch.tensor([[1.5], [0.25]])
    got = perp_neg_combine(eps_u, eps_u + e_pos, (eps_u + e_neg)[:, None], w, 4.0)
    expected = eps_u + 4.0 * (e_pos - w.view(2, 1, 1, 1) * e_neg)
    torch.testing.assert_close(got, expected)
    # a negative parallel to the positive changes nothing (plain CFG would have subtracted it)
    parallel = perp_neg_combine(eps_u, eps_u + e_pos, (eps_u + 3 * e_pos)[:, None], w, 4.0)
    torch.testing.assert_close(parallel, eps_u + 4.0 * e_pos)


def test_weights_by_azimuth_match_threestudios_defaults():
    az = torch.tensor([0.0, 90.0, 180.0, -90.0, 270.0, 45.0, 135.0, 360.0])
    mix, w = perp_neg_weights(az)
    f = lambda a, b, c, r: a * math.exp(-b * r) + c  # noqa: E731
    expected_mix = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0], [0, 1, 0], [0.5, 0.5, 0], [0, 0.5, 0.5], [1, 0, 0]]
    torch.testing.assert_close(mix, torch.tensor(expected_mix, dtype=torch.float32))
    front = [4 * E - 2.426, 1.574]  # (front, side): f_fs(1) ~ 0, f_sf(0) = 4 - 2.426
    side = [E + 0.967, E - 0.606]  # f_fsb(1), f_sb(1) ~ 0
    back = [1.967, 0.394]  # f_fsb(0) = 1 + 0.967, f_sb(0) = 1 - 0.606
    mid_front = [f(4, 0.5, -2.426, 0.5)] * 2
    mid_back = [f(1, 0.5, 0.967, 0.5), f(1, 0.5, -0.606, 0.5)]
    expected_w = [front, side, back, side, side, mid_front, mid_back, front]
    torch.testing.assert_close(w, torch.tensor(expected_w, dtype=torch.float32), atol=1e-6, rtol=1e-6)
    assert abs(w[0, 0]) < 2e-4 and abs(w[1, 1]) < 1e-3  # a view's own negative vanishes where it is the positive


def test_embeddings_interpolate_by_azimuth_and_overhead_is_plain_cfg(tiny):
    _, emb = tiny
    v = emb.views
    pos, terms = perp_neg_embeddings(v, torch.tensor([45.0, 180.0, 10.0]), [False, False, True])
    torch.testing.assert_close(pos[0], (0.5 * v["front"] + 0.5 * v["side"])[0])
    torch.testing.assert_close(pos[1], v["back"][0])
    torch.testing.assert_close(pos[2], v["overhead"][0])
    assert terms.negatives.shape == (3, 2, *v["front"].shape[1:])
    assert torch.equal(terms.negatives[1, 0], v["front"][0]) and torch.equal(terms.negatives[1, 1], v["side"][0])
    assert terms.weights[2].abs().sum() == 0 and terms.weights[1].min() > 0.3
    with pytest.raises(ValueError, match="back"):
        perp_neg_embeddings({"front": v["front"], "side": v["side"]}, torch.tensor([0.0]), [False])


def test_one_batched_prior_call_matches_separate_calls(tiny):
    prior, emb = tiny
    gen = torch.Generator().manual_seed(2)
    x_t = torch.randn(2, 3, 16, 16, generator=gen)
    t = torch.tensor([200, 600])
    pos, terms = perp_neg_embeddings(emb.views, torch.tensor([30.0, 150.0]), [False, False])
    uncond = emb.uncond.expand(2, -1, -1)
    got = predict_noise_perp_neg(prior, x_t, t, pos, uncond, terms, 7.5)
    eps_u = prior.predict_noise(x_t, t, uncond)
    eps_p = prior.predict_noise(x_t, t, pos)
    eps_n = torch.stack([prior.predict_noise(x_t, t, terms.negatives[:, i]) for i in range(2)], 1)
    # batched and separate UNet calls round differently; s = 7.5 magnifies it to ~1e-5
    torch.testing.assert_close(got, perp_neg_combine(eps_u, eps_p, eps_n, terms.weights, 7.5), atol=1e-4, rtol=1e-4)
    assert (got - prior.predict_noise(x_t, t, pos, uncond, 7.5)).abs().max() > 1e-3  # the negatives moved it
    zero = PerpNegTerms(terms.negatives, torch.zeros_like(terms.weights))
    torch.testing.assert_close(
        predict_noise_perp_neg(prior, x_t, t, pos, uncond, zero, 7.5),
        prior.predict_noise(x_t, t, pos, uncond, 7.5),
        atol=1e-4,
        rtol=1e-4,
    )


def test_sds_and_sjc_take_perp_neg(tiny):
    prior, emb = tiny
    rgb = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    t, noise = torch.tensor([100, 700]), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pos, terms = perp_neg_embeddings(emb.views, torch.tensor([0.0, 180.0]), [False, False])
    uncond = emb.uncond.expand(2, -1, -1)
    sds_loss(prior, rgb, pos, uncond, guidance_scale=5.0, t=t, noise=noise, perp_neg=terms)[0].backward()
    with torch.no_grad():
        a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = predict_noise_perp_neg(
            prior, a.sqrt() * (rgb * 2 - 1) + (1 - a).sqrt() * noise, t, pos, uncond, terms, 5.0
        )
    torch.testing.assert_close(rgb.grad, (1 - a) * (eps - noise), atol=1e-5, rtol=1e-4)  # w (eps - n) / B * 2
    x = rgb.detach().clone().requires_grad_(True)
    loss, _ = sjc_loss(
        prior, x, pos, uncond, t=t, n_noise=3, perp_neg=terms, generator=torch.Generator().manual_seed(3)
    )
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unconditional"):
        sds_loss(prior, rgb, pos, None, t=t, perp_neg=terms)


# ---- the ablation switches -------------------------------------------------------------------
def test_sds_without_noise_baseline_drops_exactly_the_injected_noise(tiny):
    prior, emb = tiny
    cond, uncond = emb.cond, emb.uncond
    t, noise = torch.tensor([100, 700]), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    rgb0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    grads = {}
    for name, kwargs in (
        ("default", {}),
        ("baseline", {"noise_baseline": True}),
        ("ablation", {"noise_baseline": False}),
    ):
        rgb = rgb0.clone().requires_grad_(True)
        sds_loss(prior, rgb, cond, uncond, guidance_scale=5.0, t=t, noise=noise, **kwargs)[0].backward()
        grads[name] = rgb.grad
    assert torch.equal(grads["default"], grads["baseline"])
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    # d loss/d rgb = w (eps_hat - eps) / B * 2 with B = 2: the ablation adds back w * eps
    torch.testing.assert_close(grads["ablation"] - grads["default"], (1 - a) * noise, atol=1e-5, rtol=1e-4)


def test_sjc_without_perturbation_scores_the_clean_render(tiny):
    prior, emb = tiny
    cond, uncond = emb.cond, emb.uncond
    t = torch.tensor([50, 600])
    rgb0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():  # D(x) = x - sigma eps_hat(sqrt(a) x): (D - x)/sigma = -eps_hat, descent grad +eps_hat
        eps = prior.predict_noise(a.sqrt() * (rgb0 * 2 - 1), t, cond.expand(2, -1, -1), uncond.expand(2, -1, -1), 5.0)
    grads = []
    for n_noise, var_red in ((1, True), (4, False)):
        rgb = rgb0.clone().requires_grad_(True)
        gen = torch.Generator().manual_seed(7)
        sjc_loss(
            prior,
            rgb,
            cond,
            uncond,
            guidance_scale=5.0,
            t=t,
            n_noise=n_noise,
            var_red=var_red,
            perturb=False,
            generator=gen,
        )[0].backward()
        torch.testing.assert_close(rgb.grad, eps, atol=1e-5, rtol=1e-4)  # grad / B * 2, B = 2
        grads.append(rgb.grad)
    perturbed = rgb0.clone().requires_grad_(True)
    sjc_loss(prior, perturbed, cond, uncond, guidance_scale=5.0, t=t, generator=torch.Generator().manual_seed(7))[
        0
    ].backward()
    assert (perturbed.grad - grads[0]).abs().max() > 1e-2
    again = rgb0.clone().requires_grad_(True)
    sjc_loss(
        prior, again, cond, uncond, guidance_scale=5.0, t=t, perturb=True, generator=torch.Generator().manual_seed(7)
    )[0].backward()
    assert torch.equal(again.grad, perturbed.grad)


def test_vsd_lora_condition_is_separate_and_defaults_to_cond(tiny):
    prior, emb = tiny
    lora = make_lora_unet(prior.unet, rank=2)
    with torch.no_grad():  # a LoRA that differs from the prior, so its text condition shows
        for name, p in lora.named_parameters():
            if "lora_B" in name or name.startswith("class_embedding"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    rgb = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    c2w = torch.eye(4).expand(2, 4, 4)
    cond, uncond = emb.for_views(["front", "back"]), emb.uncond.expand(2, -1, -1)
    grads = {}
    for name, lora_cond in (("default", None), ("same", cond), ("plain", emb.cond.expand(2, -1, -1))):
        x = rgb.clone().requires_grad_(True)
        vsd_loss(prior, lora, x, c2w, cond, uncond, generator=torch.Generator().manual_seed(4), lora_cond=lora_cond)[
            0
        ].backward()
        grads[name] = x.grad
    assert torch.equal(grads["default"], grads["same"])
    assert (grads["plain"] - grads["default"]).abs().max() > 1e-6


# ---- the stages ------------------------------------------------------------------------------
def test_coarse_step_with_perp_neg_differs_and_stays_finite(tiny):
    prior, emb = tiny
    records = {}
    for on in (False, True):
        p = CoarseParams(steps=4, batch_size=2, resolution=16, n_samples=8, occupancy_res=0, perp_neg=on)
        trainer = CoarseTrainer(p, prior, emb, CameraParams(), CPU_GRID, seed=5)
        records[on] = [trainer.step() for _ in range(2)]
    for rec in records[True]:
        assert math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"]) and rec["grad_norm"] > 0
    assert records[True][0]["grad_norm"] != pytest.approx(records[False][0]["grad_norm"], rel=1e-4)
    sjc = CoarseParams(guidance="sjc", steps=2, batch_size=2, resolution=16, n_samples=8, perp_neg=True)
    rec = CoarseTrainer(sjc, prior, emb, CameraParams(), CPU_GRID, seed=5).step()
    assert math.isfinite(rec["loss"]) and rec["grad_norm"] > 0


def test_refine_perp_neg_and_plain_lora_prompt(tmp_path):
    prior, emb, params = _setup(tmp_path)
    view = _trainer(tmp_path, prior, emb, params)
    plain = _trainer(tmp_path, prior, emb, params.model_copy(update={"lora_prompt": "plain"}))
    torch.testing.assert_close(view.lora_condition(["front", "back"]), emb.for_views(["front", "back"]))
    torch.testing.assert_close(plain.lora_condition(["front", "back"]), emb.cond.expand(2, -1, -1))
    perp = _trainer(tmp_path, prior, emb, params.model_copy(update={"perp_neg": True}))
    losses = {name: [t.step()["loss"] for _ in range(2)] for name, t in (("view", view), ("perp", perp))}
    assert all(math.isfinite(v) for v in losses["perp"])
    assert losses["perp"][1] != pytest.approx(losses["view"][1], rel=1e-6)


# ---- artifact keys ---------------------------------------------------------------------------
def _digest(params) -> str:
    return hashlib.sha256(json.dumps(params.key_params(), sort_keys=True).encode()).hexdigest()[:16]


def test_keys_unchanged_with_the_new_options_off():
    # digests of key_params() computed on main before these options existed; the coarse ones moved
    # since only with issue #14's occupancy_threshold -> occupancy_alpha
    assert _digest(CoarseParams()) == "cb95e8adf2bd14df"
    assert _digest(CoarseParams(guidance="sjc", sjc_n_noise=3)) == "d39efeb3a90fda56"
    assert _digest(RefineParams(enabled=True)) == "366577d7e9e851d1"
    off = CoarseParams(perp_neg_f_fs=(1.0, 1.0, 1.0))
    assert off.key_params() == CoarseParams().key_params()
    on = CoarseParams(perp_neg=True)
    assert on.key_params()["perp_neg_f_sb"] == [1.0, 0.5, -0.606]
    assert on.model_copy(update={"perp_neg_f_fs": (1.0, 1.0, 1.0)}).key_params() != on.key_params()
    sds, sjc = CoarseParams(guidance="sds"), CoarseParams(guidance="sjc")
    assert sds.model_copy(update={"sds_noise_baseline": False}).key_params() != sds.key_params()
    assert sjc.model_copy(update={"sds_noise_baseline": False}).key_params() == sjc.key_params()
    assert sjc.model_copy(update={"sjc_perturb": False}).key_params() != sjc.key_params()
    assert sds.model_copy(update={"sjc_perturb": False}).key_params() == sds.key_params()
    refine = RefineParams()
    assert refine.model_copy(update={"lora_prompt": "plain"}).key_params() != refine.key_params()
    assert refine.model_copy(update={"perp_neg": True}).key_params() != refine.key_params()
    assert refine.model_copy(update={"perp_neg_f_sf": (0.0, 0.0, 0.0)}).key_params() == refine.key_params()


@pytest.mark.parametrize("guidance", ["sds", "vsd"])
def test_texture_step_with_perp_neg(tmp_path, tiny, guidance):
    prior, emb = tiny
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    verts = torch.as_tensor(sphere.vertices, dtype=torch.float32)
    faces = torch.as_tensor(sphere.faces, dtype=torch.long)
    grads = {}
    for on in (False, True):
        p = TextureParams(steps=2, guidance=guidance, batch_size=2, resolution=16, lora_rank=2, perp_neg=on)
        field = _small_field(tmp_path / f"field{on}").requires_grad_(True)
        trainer = TextureTrainer(
            p, prior, emb, field, verts, faces, choose_raster("torch", "cpu"), CameraParams(), "cpu", 3
        )
        grads[on] = trainer.step()["grad_norm"]
    assert math.isfinite(grads[True]) and grads[True] > 0
    assert grads[True] != pytest.approx(grads[False], rel=1e-4)
    # perp_neg off: the key digests computed on main before it existed
    assert _digest(TextureParams()) == "7a0f963207b0c8e0"
    assert _digest(TextureParams(guidance="vsd")) == "99a9c078db58b826"
    assert TextureParams(perp_neg=True).key_params() != TextureParams().key_params()
