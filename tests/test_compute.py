"""flow.yaml `compute:` (priors/compute.py): every option against the default's SDS gradient on the
tiny priors, which options enter artifact keys, the prior cache, compile's fallback.

Tolerances (measured on this project's 2-core CPU machine, torch 2.13, SDS gradient w.r.t. a fixed
[2,3,32,32] render, CFG 7.5, fixed noise and timesteps; "rel" = max |g - g_default| / max |g_default|):
- attention: sliced, vae: sliced, channels_last: rel <= 4.1e-6 (asserted <= 1e-5);
  vae: tiled and offload: encoders are bit-identical on a CPU (tiling only starts above the VAE's
  tile size; offload is a no-op without a GPU);
- precision: bf16: ||g - g_default|| / ||g_default|| 0.025-0.032 (asserted <= 0.08, cosine >= 0.99);
- precision: fp16 (CPU kernels exist in torch >= 2.1): 0.003-0.004 (asserted <= 0.02);
- compile (T3D_TEST_COMPILE=1 only, ~55 s of inductor on a CPU): predict_noise 8.5e-6 of max |eps|;
- trace and split: bit-identical (torch.equal), which their run-time check enforces per input layout.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from t3d import runner
from t3d.flows.config import ConfigError, validate
from t3d.guidance.sds import guidance_loss
from t3d.priors import load_prior
from t3d.priors.compute import PROFILES, ComputeParams, UNetTrace
from t3d.runner import prior_loader
from t3d.stages import default_registry
from t3d.store import ArtifactStore, artifact_key
from tests.contexts import stage_context

EXACT_REL = 1e-5
BF16_REL_NORM, FP16_REL_NORM = 0.08, 0.02

# Planned keys recorded at commit 347f25e, before `compute:` existed: a flow without the block
# must keep them (every artifact already in a store stays reusable). Re-recorded once for issue 13:
# coarse.method became coarse.guidance and extract_mesh's geometry_* keys a geometry block; the
# backend requests left the stage params for flow.yaml's `backends:`; the flow's seed draws every
# stream (coarse.field.seed removed; coarse, refine, extract_mesh and texture versions bumped);
# texture.albedo_prob's default went from 0.3 to 0 (issue 14's note). Export version 2 (issue 17:
# turntable.mp4 and its params) changed the export keys; encode_prompt's key lost its seed (issue
# 17: best-of-N seeds share it), which changed every key once.
# The planned keys of two flows without `compute:`. They last moved with issue #14's occupancy_alpha (coarse)
# and #16's geometry lambda_anchor 1, then geometry band_voxels 8 and extract_mesh version 4 (the correction
# clamped inside the band), then extract_mesh version 5 (decimation's mirrored face pairs dropped); the
# later stages follow through their inputs.
TINY_FLOW = {"prompt": "a red cube", "prior": "tiny-pixel", "stages": {"refine": {"enabled": True}}}
TINY_KEYS = {
    "encode_prompt": "encode_prompt-8d5bfe0eac5f2fcd5bc8",
    "coarse": "coarse-8fae80363c1028678ff4",
    "refine": "refine-60a8168910f8e22f76a5",
    "extract_mesh": "extract_mesh-4dcc3606a91b78879b78",
    "texture": "texture-65acd3033c8d8e3a1689",
    "export": "export-a26d233c6d5f7ed91648",
}
LATENT_FLOW = {"prompt": "a red cube", "prior": "tiny-latent"}
LATENT_KEYS = {
    "encode_prompt": "encode_prompt-dfc3c843745275968f68",
    "coarse": "coarse-39cdbffb9aeabfc7f089",
    "extract_mesh": "extract_mesh-1d4278aab7c42b9a770e",
    "texture": "texture-7f8f8a25a3bb38a59abf",
    "export": "export-4545c4de9189b1b0f3df",
}


# ---- artifact keys -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registry():
    return default_registry()


def _keys(data: dict, registry, tmp_path) -> dict[str, str]:
    cfg = validate(data, registry)
    return {p.name: p.key for p in runner.plan(cfg, cfg.prompt, registry, ArtifactStore(str(tmp_path / "store")))}


def test_a_flow_without_compute_keeps_its_keys(registry, tmp_path):
    assert _keys(TINY_FLOW, registry, tmp_path) == TINY_KEYS
    assert _keys(LATENT_FLOW, registry, tmp_path) == LATENT_KEYS
    assert _keys({**TINY_FLOW, "compute": {}}, registry, tmp_path) == TINY_KEYS
    assert _keys({**TINY_FLOW, "compute": {"precision": "auto", "profile": "default"}}, registry, tmp_path) == TINY_KEYS


def test_options_that_cannot_change_results_stay_out_of_keys(registry, tmp_path):
    same = {
        "attention": "sliced",
        "vae": "sliced",
        "offload": "encoders",
        "channels_last": True,
        "compile": True,
        "trace": False,
        "split": True,
        "cfg_halves": True,
    }
    assert _keys({**TINY_FLOW, "compute": same}, registry, tmp_path) == TINY_KEYS
    assert _keys({**LATENT_FLOW, "compute": same}, registry, tmp_path) == LATENT_KEYS
    assert _keys({**LATENT_FLOW, "compute": {"profile": "low-memory"}}, registry, tmp_path) == LATENT_KEYS


def test_precision_enters_only_the_keys_of_stages_that_run_the_prior(registry, tmp_path):
    cfg = validate({**TINY_FLOW, "compute": {"precision": "fp16"}}, registry)
    planned = {p.name: p for p in runner.plan(cfg, cfg.prompt, registry, ArtifactStore(str(tmp_path / "store")))}
    for name in ("encode_prompt", "coarse", "refine", "extract_mesh", "texture"):
        assert registry[name].uses_prior and planned[name].key != TINY_KEYS[name], name
    # export never runs the prior: its key changes only because its inputs did; its own context
    # is exactly what it was without `compute:`.
    export = planned["export"]
    assert not registry["export"].uses_prior
    prior = runner.prior_identity(cfg.prior)
    expected = artifact_key(
        "export",
        registry["export"].version,
        cfg.stages.export.key_params(),
        cfg.seed,
        export.inputs,
        prior,
        {"camera": cfg.camera.model_dump(mode="json")},
    )
    assert export.key == expected
    # each explicit precision is its own key; tiled VAE changes results, so it is keyed too
    others = [
        _keys({**TINY_FLOW, "compute": {"precision": p}}, registry, tmp_path)["encode_prompt"]
        for p in ("fp32", "fp16", "bf16")
    ]
    assert len(set(others) | {TINY_KEYS["encode_prompt"]}) == 4
    tiled = _keys({**LATENT_FLOW, "compute": {"vae": "tiled"}}, registry, tmp_path)
    assert tiled["encode_prompt"] != LATENT_KEYS["encode_prompt"]


def test_compute_block_is_validated():
    with pytest.raises(ConfigError, match=r"unknown key 'compute.precison'. did you mean 'precision'"):
        validate({"prompt": "a", "compute": {"precison": "fp16"}})
    with pytest.raises(ConfigError, match=r"'compute.precision': Input should be 'auto', 'fp32', 'fp16' or 'bf16'"):
        validate({"prompt": "a", "compute": {"precision": "fp8"}})
    with pytest.raises(ConfigError, match=r"'compute.compile': Input should be a valid boolean"):
        validate({"prompt": "a", "compute": {"compile": "maybe"}})
    with pytest.raises(ConfigError, match=r"'compute.profile': Input should be 'default' or 'low-memory'"):
        validate({"prompt": "a", "compute": {"profile": "low-mem"}})


def test_profile_expands_and_written_keys_win():
    low = ComputeParams(profile="low-memory")
    assert {k: getattr(low, k) for k in PROFILES["low-memory"]} == PROFILES["low-memory"]
    assert low.precision == "auto" and low.attention == "sdpa" and low.key_context() == {}
    mixed = ComputeParams(profile="low-memory", offload="none", attention="sliced")
    assert (mixed.vae, mixed.offload, mixed.attention) == ("sliced", "none", "sliced")
    # a config sent to a worker (model_dump, then validated again) means the same thing
    assert ComputeParams.model_validate(mixed.model_dump(mode="json")) == mixed


# ---- gradients -----------------------------------------------------------------------------
def sds_grad(prior) -> torch.Tensor:
    """The SDS gradient w.r.t. a fixed render: fixed noise and timesteps (generator), and the VAE
    posterior's sample (diffusers draws it from the global RNG) seeded too."""
    torch.manual_seed(123)
    gen = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).requires_grad_()
    cond = prior.encode_text(["a red cube, front view", "a red cube, side view"])
    uncond = prior.encode_text(["", ""])
    loss, _ = guidance_loss("sds", prior, rgb, cond, uncond, guidance_scale=7.5, generator=gen)
    loss.backward()
    assert loss.dtype == torch.float32 and rgb.grad.dtype == torch.float32  # the field side stays fp32
    return rgb.grad


@pytest.fixture(scope="module")
def default_grads():
    return {src: sds_grad(load_prior(src)) for src in ("tiny-latent", "tiny-pixel")}


def _rel_max(g, ref) -> float:
    return float((g - ref).abs().max() / ref.abs().max())


def _rel_norm(g, ref) -> float:
    return float((g - ref).norm() / ref.norm())


EXACT = [
    {"attention": "sliced"},
    {"vae": "sliced"},
    {"vae": "tiled"},
    {"offload": "encoders"},
    {"channels_last": True},
    {"attention": "sliced", "vae": "sliced", "offload": "encoders", "channels_last": True},
]


@pytest.mark.parametrize("source", ["tiny-latent", "tiny-pixel"])
@pytest.mark.parametrize("options", EXACT, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_same_maths_options_give_the_default_gradient(source, options, default_grads):
    prior = load_prior(source, compute=ComputeParams(**options))
    if options.get("attention") == "sliced":
        assert any("Sliced" in type(p).__name__ for p in prior.unet.attn_processors.values())
    if options.get("channels_last"):
        w = prior.unet.conv_in.weight
        assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    if prior.vae is not None and "vae" in options:
        assert getattr(prior.vae, "use_" + {"sliced": "slicing", "tiled": "tiling"}[options["vae"]])
    g = sds_grad(prior)
    rel = _rel_max(g, default_grads[source])
    print(f"{source} {options}: max abs diff / max |grad| = {rel:.3g}")
    assert rel <= EXACT_REL


def _half_ok(dtype) -> bool:
    try:
        torch.nn.functional.conv2d(torch.ones(1, 1, 4, 4, dtype=dtype), torch.ones(1, 1, 3, 3, dtype=dtype))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("source", ["tiny-latent", "tiny-pixel"])
@pytest.mark.parametrize("precision,bound", [("bf16", BF16_REL_NORM), ("fp16", FP16_REL_NORM)])
def test_half_precision_is_close_to_fp32(source, precision, bound, default_grads):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if not _half_ok(dtype):
        pytest.skip(f"this torch build has no CPU {precision} convolution")
    prior = load_prior(source, compute=ComputeParams(precision=precision))
    assert prior.dtype == dtype and next(prior.unet.parameters()).dtype == dtype
    assert prior.compute["dtype"] == str(dtype).replace("torch.", "")
    g, ref = sds_grad(prior), default_grads[source]
    rel, cos = _rel_norm(g, ref), float(torch.nn.functional.cosine_similarity(g.flatten(), ref.flatten(), dim=0))
    print(f"{source} {precision}: ||g - g_fp32|| / ||g_fp32|| = {rel:.3g}, cosine {cos:.5f}")
    assert rel <= bound and cos >= 0.99


def test_explicit_fp32_is_auto_on_a_cpu(default_grads):
    assert torch.equal(
        sds_grad(load_prior("tiny-latent", compute=ComputeParams(precision="fp32"))), default_grads["tiny-latent"]
    )


def test_vsd_lora_copy_keeps_the_options():
    """VSD deep-copies prior.unet for its LoRA branch: sliced attention and channels_last travel
    with it, and a fresh LoRA still predicts what the pretrained UNet does."""
    from t3d.guidance.vsd import make_lora_unet

    outs = []
    for compute in (None, ComputeParams(attention="sliced", channels_last=True)):
        prior = load_prior("tiny-pixel", compute=compute)
        lora = make_lora_unet(prior.unet, rank=2)
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        t, cond = torch.tensor([200, 700]), prior.encode_text(["a", "b"])
        with torch.no_grad():
            outs.append(prior.predict_noise(x, t, cond, unet=lora, class_labels=torch.zeros(2, 16)))
    assert _rel_max(outs[1], outs[0]) <= EXACT_REL


# ---- offload, compile, the prior cache -----------------------------------------------------
def test_offload_is_a_recorded_no_op_on_a_cpu():
    prior = load_prior("tiny-latent", compute=ComputeParams(offload="encoders"))
    assert prior.offload_device is None and prior.compute["offload"].startswith("none (the device is the CPU)")


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: offload moves modules between the GPU and the CPU"
)
def test_offload_keeps_encoders_on_the_cpu_between_calls():
    prior = load_prior("tiny-latent", device="cuda", compute=ComputeParams(offload="encoders"))
    ref = load_prior("tiny-latent", device="cuda")
    assert prior.compute["offload"] == "encoders"
    on_cpu = lambda: {next(m.parameters()).device.type for m in (prior.text_encoder, prior.vae.decoder)}  # noqa: E731
    assert on_cpu() == {"cpu"} and next(prior.vae.encoder.parameters()).device.type == "cuda"
    cond = prior.encode_text(["a red cube"])
    assert cond.device.type == "cuda" and on_cpu() == {"cpu"}
    torch.testing.assert_close(cond, ref.encode_text(["a red cube"]))
    z = torch.randn(1, 4, 16, 16, device="cuda")
    torch.testing.assert_close(prior.model_to_images(z), ref.model_to_images(z))
    assert on_cpu() == {"cpu"}


class _Boom:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        raise RuntimeError("simulated inductor failure")


def test_a_failing_compiled_unet_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(torch, "compile", lambda module, *a, **k: _Boom())
    prior = load_prior("tiny-pixel", compute=ComputeParams(compile=True))
    assert prior.compute["compile"] is True and prior.compiled_unet is not None
    ref = load_prior("tiny-pixel")
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([100, 800])
    cond = ref.encode_text(["a", "b"])
    with caplog.at_level(logging.WARNING, logger="t3d"):
        first = prior.predict_noise(x, t, cond)
        second = prior.predict_noise(x, t, cond)
    warnings = [r for r in caplog.records if "compute.compile" in r.getMessage()]
    assert len(warnings) == 1 and "simulated inductor failure" in warnings[0].getMessage()
    assert prior.compiled_unet is None and prior.compute["compile"].startswith("failed, eager: RuntimeError")
    expected = ref.predict_noise(x, t, cond)
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_compile_that_raises_at_once_falls_back(monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported here")

    monkeypatch.setattr(torch, "compile", refuse)
    with caplog.at_level(logging.WARNING, logger="t3d"):
        prior = load_prior("tiny-pixel", compute=ComputeParams(compile=True))
    assert prior.compiled_unet is None and prior.compute["compile"].startswith("failed, eager")
    assert sum("compute.compile" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.skipif(
    os.environ.get("T3D_TEST_COMPILE") != "1",
    reason="real torch.compile takes ~55 s of inductor on a CPU; set T3D_TEST_COMPILE=1",
)
def test_real_compile_matches_eager():
    prior, ref = load_prior("tiny-pixel", compute=ComputeParams(compile=True)), load_prior("tiny-pixel")
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([300, 600])
    cond, uncond = ref.encode_text(["a", "b"]), ref.encode_text(["", ""])
    out = prior.predict_noise(x, t, cond, uncond, guidance_scale=7.5)
    assert prior.compute["compile"] is True
    assert _rel_max(out, ref.predict_noise(x, t, cond, uncond, guidance_scale=7.5)) <= 1e-4


def test_prior_cache_keys_on_the_options(monkeypatch):
    monkeypatch.setattr(runner, "_prior_cache", {})
    calls = []

    def loader(source, device, compute=None):
        calls.append(compute)
        return object()

    a = runner._cached_prior(loader, "tiny-pixel", "cpu", ComputeParams())
    assert runner._cached_prior(loader, "tiny-pixel", "cpu", ComputeParams(profile="default")) is a
    b = runner._cached_prior(loader, "tiny-pixel", "cpu", ComputeParams(attention="sliced"))
    assert b is not a and len(calls) == 2
    assert len(runner._prior_cache) == 1  # the old copy is dropped, not kept beside the new one


def test_stage_context_loads_with_the_flow_options_and_records_them(monkeypatch, tmp_path):

    monkeypatch.setattr(runner, "_prior_cache", {})
    ctx = stage_context(
        tmp_path,
        "encode_prompt",
        prior_loader=prior_loader("tiny-latent", "cpu", ComputeParams(vae="sliced", precision="bf16")),
    )
    prior = ctx.load_prior()
    assert prior.dtype == torch.bfloat16 and prior.vae.use_slicing
    assert ctx.backend["compute"]["vae"] == "sliced" and ctx.backend["compute"]["dtype"] == "bfloat16"


# ---- t3d doctor ----------------------------------------------------------------------------
def test_doctor_recommends_a_profile_from_free_gpu_memory():
    from t3d.cli.doctor import recommend_profile

    gib = 2**30
    assert recommend_profile(None).startswith("no GPU: compute: options other than precision do nothing useful here")
    assert "defaults" in recommend_profile(40 * gib) and "low-memory" not in recommend_profile(40 * gib)
    assert "profile: low-memory" in recommend_profile(12 * gib) and "may not fit" not in recommend_profile(12 * gib)
    assert "profile: low-memory" in recommend_profile(6 * gib) and "SD 2.1 at 512 px may not fit" in recommend_profile(
        6 * gib
    )


def test_doctor_names_the_install_command_of_each_missing_piece(monkeypatch):
    from t3d.cli import doctor

    rows = {name: (ok, detail) for name, ok, detail in doctor.checks()}
    assert "compute profile" in rows
    if torch.cuda.is_available():
        assert "GiB free of" in rows["GPU memory"][1]
    else:
        assert rows["compute profile"][1].startswith("no GPU")
        if torch.version.cuda is None:
            assert "T3D_CUDA=1 bash scripts/install.sh" in rows["CUDA"][1]
    from t3d.fields.hashgrid import choose_hashgrid
    from t3d.render.raster import choose_raster

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for lib, choose, command in (
        ("nvdiffrast", choose_raster, "pip install diffrp-nvdiffrast"),
        ("tinycudann", choose_hashgrid, "tiny-cuda-nn/#subdirectory=bindings/torch"),
    ):
        ok, detail = rows[lib]
        assert ok or command in detail, detail
        # doctor asks the chooser a run uses (same smoke op, same cache): it reports what a run gets
        choice = choose("auto", device).choice
        assert ok == (choice.backend == lib)
        assert detail == "smoke op passed" if ok else detail.startswith(choice.reason + ";"), detail
    monkeypatch.setattr(doctor, "_try", lambda fn: (False, "ModuleNotFoundError: no module"))
    rows = {name: detail for name, ok, detail in doctor.checks() if name == "xatlas"}
    assert "`bash scripts/install.sh` installs it" in rows["xatlas"]


# ---- trace and split: the same bits as the eager UNet ----------------------------------------
def _unet_inputs(prior, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = prior.unet.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.randint(20, 980, (batch,), generator=g)
    cond = prior.encode_text(["a red cube"] * (batch // 2) + [""] * (batch - batch // 2))
    return x, t, cond


@pytest.mark.parametrize("source", ["tiny-latent", "tiny-pixel"])
def test_trace_and_split_give_the_eager_bits(source, monkeypatch):
    """The coarse stage's call as one stacked CFG call (cfg_halves off): 4 renders, so a batch of
    8 whose halves are cond and uncond."""
    monkeypatch.setattr(UNetTrace, "TRACE_AFTER", 3)  # the default waits 20 calls
    eager = load_prior(source, compute=ComputeParams(trace=False, cfg_halves=False))
    traced = load_prior(source, compute=ComputeParams(trace=True, split=True, cfg_halves=False))
    assert eager.traced_unet is None and eager.compute["trace"] is False
    assert traced.compute["trace"] is True and traced.compute["split"] is True
    with torch.no_grad():
        # calls 1-2 run eagerly, the 3rd decides the plan, the next 3 run the halves serially, then threads
        for seed in range(8):
            x, t, cond = _unet_inputs(eager, 8, seed)
            x, t, cond_u, uncond = x[:4], t[:4], cond[:4], cond[4:]
            got = traced.predict_noise(x, t, cond_u, uncond, guidance_scale=7.5)
            assert torch.equal(got, eager.predict_noise(x, t, cond_u, uncond, guidance_scale=7.5)), seed
    (plan,) = traced.traced_unet.plans.values()
    # Batch 8's halves match it bit for bit on these priors and the embedded one (other batch sizes
    # need not: oneDNN picks its convolutions by batch size, and the first call's check then keeps
    # the whole-batch trace).
    assert plan is not None and plan["half"] is not None and plan["calls"] == 6
    assert traced.traced_unet.seen == {next(iter(traced.traced_unet.plans)): 3}


@pytest.mark.parametrize("channels_last", [False, True])
def test_cfg_halves_split_at_every_batch_size_with_the_serial_bits(channels_last, monkeypatch):
    """cfg_halves defines CFG as two half calls, so the split serves batch 4 and channels_last
    renders too (the geometry and texture stages' calls), which the stacked call cannot."""
    monkeypatch.setattr(UNetTrace, "TRACE_AFTER", 3)
    eager = load_prior("tiny-pixel", compute=ComputeParams(trace=False, cfg_halves=True))
    traced = load_prior("tiny-pixel", compute=ComputeParams(trace=True, split=True, cfg_halves=True))
    stacked = load_prior("tiny-pixel", compute=ComputeParams(trace=False, cfg_halves=False))
    assert traced.compute["cfg_halves"] is True and stacked.compute["cfg_halves"] is False
    differs = False
    with torch.no_grad():
        for batch in (1, 2):  # CFG doubles it to 2, 4
            for seed in range(7):  # calls 1-2 eager, 3rd decides, 4-5 serial halves, 6-7 on two threads
                x, t, cond = _unet_inputs(eager, 2 * batch, seed)
                x, t, cond_u, uncond = x[:batch], t[:batch], cond[:batch], cond[batch:]
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                args = (x, t, cond_u, uncond)
                want = eager.predict_noise(*args, guidance_scale=7.5)
                assert torch.equal(traced.predict_noise(*args, guidance_scale=7.5), want), (batch, seed)
                differs |= not torch.equal(stacked.predict_noise(*args, guidance_scale=7.5), want)
    plans = traced.traced_unet.plans
    assert len(plans) == 2 and all(p is not None and p["half"] is not None and p["calls"] == 5 for p in plans.values())
    if channels_last:  # oneDNN rounds these halves differently from the stacked batch
        assert differs


def test_cfg_halves_is_off_by_default_and_auto_follows_the_size_rule_not_the_trace(monkeypatch):
    assert load_prior("tiny-pixel").compute["cfg_halves"] is False  # it changes results: opt-in
    auto = ComputeParams(cfg_halves="auto")
    assert load_prior("tiny-pixel", compute=auto).compute["cfg_halves"] is True
    assert load_prior("tiny-pixel", compute=ComputeParams(cfg_halves="auto", trace=False)).cfg_halves is True
    monkeypatch.setattr("t3d.priors.compute.TRACE_AUTO_MAX_PARAMS", 1000)
    assert load_prior("tiny-pixel", compute=auto).cfg_halves is False
    assert load_prior("tiny-pixel", compute=ComputeParams(cfg_halves=True)).cfg_halves is True


def test_without_split_the_whole_batch_trace_serves(monkeypatch):
    monkeypatch.setattr(UNetTrace, "TRACE_AFTER", 3)
    eager = load_prior("tiny-pixel", compute=ComputeParams(trace=False))
    traced = load_prior("tiny-pixel", compute=ComputeParams(trace=True, split=False))

    def halves_ran(*_):
        raise AssertionError("the half trace ran without split")

    with torch.no_grad():
        for seed in range(5):
            x, t, cond = _unet_inputs(eager, 8, seed)
            if seed == 3:  # the 3rd call decided the plan: batch 8 has a half trace
                (plan,) = traced.traced_unet.plans.values()
                assert plan["half"] is not None
                plan["half"] = halves_ran
            got = traced._unet_call(traced.unet, x, t, encoder_hidden_states=cond).sample
            assert torch.equal(got, eager.unet(x, t, encoder_hidden_states=cond).sample)


def test_every_batch_size_gives_the_eager_bits(monkeypatch):
    monkeypatch.setattr(UNetTrace, "TRACE_AFTER", 3)
    eager = load_prior("tiny-pixel", compute=ComputeParams(trace=False))
    traced = load_prior("tiny-pixel", compute=ComputeParams(trace=True, split=True))
    with torch.no_grad():
        for batch in (1, 2, 4, 6, 16):
            for seed in range(5):
                x, t, cond = _unet_inputs(eager, batch, seed)
                expected = eager.unet(x, t, encoder_hidden_states=cond).sample
                assert torch.equal(traced._unet_call(traced.unet, x, t, encoder_hidden_states=cond).sample, expected), (
                    batch
                )
    assert len(traced.traced_unet.plans) == 5


def test_split_is_refused_where_the_halves_would_differ(monkeypatch):
    """channels_last inputs: oneDNN's convolutions then depend on the batch size, so the first
    call's check keeps the whole-batch trace and the outputs stay the eager ones."""
    monkeypatch.setattr(UNetTrace, "TRACE_AFTER", 3)
    eager = load_prior("tiny-pixel", compute=ComputeParams(trace=False))
    traced = load_prior("tiny-pixel", compute=ComputeParams(trace=True, split=True))
    with torch.no_grad():
        for seed in range(5):
            x, t, cond = _unet_inputs(eager, 4, seed)
            x = x.contiguous(memory_format=torch.channels_last)
            expected = eager.unet(x, t, encoder_hidden_states=cond).sample
            assert torch.equal(traced._unet_call(traced.unet, x, t, encoder_hidden_states=cond).sample, expected)
            halves = torch.cat(
                [eager.unet(x[i : i + 2], t[i : i + 2], encoder_hidden_states=cond[i : i + 2]).sample for i in (0, 2)]
            )
    (plan,) = traced.traced_unet.plans.values()
    assert plan["half"] is None or torch.equal(halves, expected)


def test_trace_steps_aside_for_grad_extra_arguments_and_changed_weights():
    prior = load_prior("tiny-pixel", compute=ComputeParams(trace=True))
    x, t, cond = _unet_inputs(prior, 2)
    assert prior.traced_unet(x, t, encoder_hidden_states=cond) is None  # grad mode: eager
    with torch.no_grad():
        assert prior.traced_unet(x, t, encoder_hidden_states=cond, class_labels=t) is None
        waiting = UNetTrace.TRACE_AFTER - 1  # short uses never pay for a trace
        assert [prior.traced_unet(x, t, encoder_hidden_states=cond) for _ in range(waiting)] == [None] * waiting
        assert not prior.traced_unet.plans
        before = prior.traced_unet(x, t, encoder_hidden_states=cond).sample
        assert torch.equal(prior.traced_unet(x, t, encoder_hidden_states=cond).sample, before)
        assert list(prior.traced_unet.plans.values())[0]["calls"] == 2  # the trace served the next call
        next(prior.unet.parameters()).mul_(1.5)  # weights written in place: the frozen constants are stale
        after = prior.traced_unet(x, t, encoder_hidden_states=cond).sample
        assert not torch.equal(after, before)
        assert torch.equal(after, prior.unet(x, t, encoder_hidden_states=cond).sample)


def test_trace_auto_is_for_small_cpu_unets_and_yaml_switches_parse(monkeypatch):
    import yaml

    assert ComputeParams.model_validate(yaml.safe_load("trace: off\nsplit: on")).model_dump()["trace"] is False
    assert ComputeParams.model_validate(yaml.safe_load("split: on")).split is True
    assert load_prior("tiny-pixel").compute["trace"] is True  # the default on a CPU
    monkeypatch.setattr("t3d.priors.compute.TRACE_AUTO_MAX_PARAMS", 1000)
    assert load_prior("tiny-pixel").traced_unet is None
    assert load_prior("tiny-pixel", compute=ComputeParams(trace=True)).traced_unet is not None
    assert load_prior("tiny-pixel", compute=ComputeParams(trace=True, compile=True)).traced_unet is None


def test_trace_and_split_take_auto_true_or_false_with_one_error(tmp_path):
    flow = tmp_path / "flow.yaml"
    flow.write_text("prompt: a red cube\ncompute: {trace: maybe}\n")
    with pytest.raises(ConfigError) as err:
        from t3d.flows.config import load_config

        load_config(flow, [], default_registry())
    assert str(err.value).count("\n") == 0 and "compute.trace" in str(err.value)
    assert "use auto, true or false" in str(err.value) and "'maybe'" in str(err.value)


def test_a_trace_that_fails_warns_once_and_runs_eagerly(monkeypatch, caplog):
    """What happens the day torch drops torch.jit (deprecated in 2.13): eager, one warning."""

    def refuse(*args, **kwargs):
        raise RuntimeError("torch.jit is gone")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    monkeypatch.setattr(UNetTrace, "TRACE_AFTER", 1)
    eager = load_prior("tiny-pixel", compute=ComputeParams(trace=False))
    traced = load_prior("tiny-pixel", compute=ComputeParams(trace=True))
    x, t, cond = _unet_inputs(eager, 2)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="t3d"):
        outs = [traced._unet_call(traced.unet, x, t, encoder_hidden_states=cond).sample for _ in range(3)]
        expected = eager.unet(x, t, encoder_hidden_states=cond).sample
    assert all(torch.equal(o, expected) for o in outs)
    assert traced.traced_unet.failed.startswith("RuntimeError: torch.jit is gone")
    assert sum("compute.trace" in r.getMessage() for r in caplog.records) == 1
