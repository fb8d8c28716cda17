"""flow.yaml `compute:`: how the prior runs (precision, attention, VAE, offload, layout, compile).

    compute:
      profile: low-memory     # optional shortcut; keys written beside it win over what it expands to
      precision: auto         # auto | fp32 | fp16 | bf16
      attention: sdpa         # sdpa | sliced
      vae: full               # full | sliced | tiled
      offload: none           # none | encoders
      channels_last: false
      compile: false
      trace: auto             # auto | true | false
      split: auto             # auto | true | false (needs trace)
      cfg_halves: false       # auto | true | false

Every option acts on the prior only. The field's parameters, the renders, the SDS/SJC/VSD
gradient and the loss stay float32 whatever `precision` says: the guidance code casts the
prior's outputs back to float32 before it forms the gradient (t3d.guidance.sds).

Which options enter artifact keys (`key_context`), and why. The rule is the one the keys already
follow for the device (a CPU and a GPU run of the same flow share keys): options that compute the
same maths in another order, kernel or place stay out, because what they change is float rounding;
options that change the maths go in, for the stages that run the prior (their downstream stages
follow through their input keys):
- precision, unless `auto`: half precision rounds every weight and activation of the prior.
  `auto` keeps the keys t3d had before `compute:` existed (it is what load_prior always did).
- vae: tiled: diffusers' tiled encode blends overlapping tiles once a render is larger than the
  VAE's tile (its config's sample_size), which changes the latents.
- attention, vae: sliced, offload, channels_last, compile, trace, split, cfg_halves: never (same
  maths; measured on the tiny priors in tests/test_compute.py; trace and split give the same bits).

cfg_halves runs classifier-free guidance's cond and uncond halves as two UNet calls instead of one
call on the stacked batch. It is the same maths, but oneDNN picks its convolutions by batch size,
so for some batch sizes and layouts (the toy prior at batch 4, channels_last renders) the halves
round differently from the whole. Defining CFG as two calls makes every such call splittable
(`split` then runs the halves on two cores with the same bits as running them one after the
other), which the stacked call is only where the rounding happens to agree (batch 8). `auto`
follows `trace`'s size rule but not its setting or success, so `trace: false` reproduces a traced
run's bits and a machine's core count never changes them. It is off by default: unlike trace and
split it changes results, and at seed 0 the rounding alone moved bench/quality.py's blue cube out
of the cube gate (README, compute).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger("t3d")

Precision = Literal["auto", "fp32", "fp16", "bf16"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# What each `profile:` expands to. Keys the user writes beside `profile:` override these.
# low-memory leaves `attention` at sdpa: on torch >= 2 SDPA dispatches to memory-efficient or
# flash kernels that never hold the N x N attention matrix, while diffusers' sliced processor
# computes it slice by slice with baddbmm, so slicing only helps where SDPA falls back to its math
# kernel. It leaves precision at auto, which is already fp16 on CUDA for SD / IF / the toy prior
# (an explicit fp16 would give every artifact a new key for the same numbers).
# compute.trace: auto traces UNets up to this size on a CPU. There the per-module Python overhead
# is a sixth of a forward pass (the toy prior: 80 -> 68 ms at batch 8, one thread); an SD-sized
# UNet's kernels dwarf it, and freezing would hold its weights a second time.
TRACE_AUTO_MAX_PARAMS = 50_000_000

PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "low-memory": {"vae": "sliced", "offload": "encoders"},
}


class ComputeParams(BaseModel):
    """flow.yaml `compute:` (see this module's docstring for what enters artifact keys)."""

    model_config = ConfigDict(extra="forbid")

    profile: Literal["default", "low-memory"] | None = Field(
        None,
        description=(
            "a named set of the keys below: low-memory = {vae: sliced, offload: encoders}; keys written beside it win"
        ),
    )
    precision: Precision = Field(
        "auto",
        description=(
            "dtype of the prior's weights and activations: auto = fp16 on CUDA (fp32 for the tiny "
            "test priors), fp32 on CPU; "
            "bf16 works on a CPU but is slow there; the field, the gradient and the loss stay fp32"
        ),
    )
    attention: Literal["sdpa", "sliced"] = Field(
        "sdpa",
        description=(
            "sdpa: diffusers' default (torch's scaled_dot_product_attention); sliced: unet.set_attention_slice('auto')"
        ),
    )
    vae: Literal["full", "sliced", "tiled"] = Field(
        "full",
        description=(
            "sliced: one render at a time through the VAE; tiled: diffusers' tiling (only for "
            "renders larger than the VAE's sample_size)"
        ),
    )
    offload: Literal["none", "encoders"] = Field(
        "none",
        description=(
            "encoders: the text encoder and the VAE's decoder live on the CPU and visit the GPU only when called"
        ),
    )
    channels_last: bool = Field(
        False, description="the UNet's weights in channels_last memory format (faster convolutions on tensor cores)"
    )
    compile: bool = Field(
        False,
        description="torch.compile the UNet (first steps compile; falls back to eager with one warning if that fails)",
    )
    split: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "with trace: run a batch's two halves (CFG's cond and uncond) on two threads; same bits; auto = on "
            "with one torch thread on a multi-core machine (the main job's coarse prior time 29 -> 19-21 s on 2 "
            "cores; no slower beside a busy process)"
        ),
    )
    cfg_halves: bool | Literal["auto"] = Field(
        False,
        description=(
            "run CFG's cond and uncond halves as two UNet calls instead of one stacked call (same maths, other "
            "float rounding at some batch sizes), so that `split` can put them on two cores at every batch size "
            "(the main job's extract_mesh + texture ~4 s faster on 2 cores); "
            f"auto = on for a CPU UNet of at most {TRACE_AUTO_MAX_PARAMS // 10**6}M parameters; off by default "
            "because it changes results (README: compute)"
        ),
    )
    trace: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "run the UNet's no-grad calls through a frozen TorchScript trace (one per input shape): the same "
            f"kernels and bits without diffusers' per-module Python overhead; auto = on for a CPU UNet of at "
            f"most {TRACE_AUTO_MAX_PARAMS // 10**6}M parameters without compile (a sixth of the toy prior's forward)"
        ),
    )

    @field_validator("trace", "split", "cfg_halves", mode="before")
    @classmethod
    def _auto_or_bool(cls, value: Any) -> Any:
        """One clear error for anything but auto / true / false (YAML reads on/off as booleans)."""
        if isinstance(value, bool) or value == "auto":
            return value
        raise ValueError("use auto, true or false")

    @model_validator(mode="before")
    @classmethod
    def _expand_profile(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("profile"), str) and data["profile"] in PROFILES:
            data = {**PROFILES[data["profile"]], **data}
        return data

    def key_context(self) -> dict:
        """What goes into the artifact keys of stages that run the prior: empty for the defaults,
        so a flow without `compute:` keeps the keys it had before this block existed."""
        out: dict[str, str] = {}
        if self.precision != "auto":
            out["precision"] = self.precision
        if self.vae == "tiled":
            out["vae"] = "tiled"
        return out

    def load_key(self) -> tuple:
        """Everything that changes the loaded prior object (the in-process prior cache's key)."""
        return tuple(sorted(self.model_dump(exclude={"profile"}).items()))

    def torch_dtype(self) -> torch.dtype | None:
        """The dtype to load the prior in; None for auto (load_prior's own default)."""
        return DTYPES.get(self.precision)


def apply_compute(prior, compute: ComputeParams | None) -> Any:
    """Apply the options to a freshly loaded prior in place (and return it). What was applied,
    including options that are no-ops here (offload on a CPU, VAE options on a pixel prior), is
    recorded in `prior.compute`, which stages copy into their manifest's `backend`."""
    compute = compute or ComputeParams()
    report: dict[str, Any] = {"precision": compute.precision, "dtype": str(prior.dtype).replace("torch.", "")}
    unet = prior.unet

    # attention. sdpa needs no call: diffusers installs torch's SDPA processors by default on
    # torch >= 2 (AttnProcessor2_0, or AttnAddedKVProcessor2_0 in DeepFloyd IF's UNet, which a
    # blanket set_attn_processor(AttnProcessor2_0()) would break).
    if compute.attention == "sliced":
        unet.set_attention_slice("auto")
    report["attention"] = compute.attention

    # VAE (latent priors only)
    if prior.vae is None:
        report["vae"] = "full" if compute.vae == "full" else f"full ({compute.vae} ignored: pixel-space prior, no VAE)"
    else:
        if compute.vae == "sliced":
            prior.vae.enable_slicing()
        elif compute.vae == "tiled":
            prior.vae.enable_tiling()
        report["vae"] = compute.vae

    if compute.channels_last:
        unet.to(memory_format=torch.channels_last)
    report["channels_last"] = compute.channels_last

    # offload: the text encoder is only needed by encode_prompt (later stages read its cached
    # embeddings) and the VAE's decoder only for previews of samples; SDS encodes renders through
    # the VAE's encoder every step and backpropagates through it, so that half stays on the device.
    if compute.offload == "encoders":
        if prior.device.type == "cpu":
            report["offload"] = "none (the device is the CPU)"
        else:
            prior.offload_device = torch.device("cpu")
            for module in offloadable_modules(prior):
                module.to(prior.offload_device)
            report["offload"] = "encoders"
    else:
        report["offload"] = "none"

    report["compile"] = False
    if compute.compile:
        try:
            prior.compiled_unet = torch.compile(unet)
            report["compile"] = True
        except Exception as exc:  # e.g. a Python version dynamo does not support yet
            report["compile"] = f"failed, eager: {type(exc).__name__}: {exc}"[:300]
            log.warning(
                "compute.compile: torch.compile of the UNet failed (%s: %s); running it uncompiled",
                type(exc).__name__,
                str(exc).splitlines()[0][:200] if str(exc) else "",
            )
    prior.traced_unet = None
    if _trace_wanted(compute, prior, unet):
        prior.traced_unet = UNetTrace(unet, split=compute.split)
    report["trace"] = prior.traced_unet is not None
    report["split"] = compute.split if prior.traced_unet is not None else False
    prior.cfg_halves = _small_cpu_unet(prior, unet) if compute.cfg_halves == "auto" else bool(compute.cfg_halves)
    report["cfg_halves"] = prior.cfg_halves
    prior.compute = report
    return prior


def _trace_wanted(compute: ComputeParams, prior, unet) -> bool:
    if compute.trace is False or prior.compiled_unet is not None:
        return False
    if compute.trace is True:
        return True
    return _small_cpu_unet(prior, unet)


def _small_cpu_unet(prior, unet) -> bool:
    """The `auto` rule of trace and cfg_halves."""
    return prior.device.type == "cpu" and sum(p.numel() for p in unet.parameters()) <= TRACE_AUTO_MAX_PARAMS


def call_in_halves(fn, args: tuple, kwargs: dict) -> UNetOutput:
    """fn on the first half of a batch, then on the second, concatenated (compute.cfg_halves).
    Every tensor argument whose first dimension is the batch's is halved."""
    n = args[0].shape[0]

    def part(lo: int, hi: int):
        a = tuple(x[lo:hi] if torch.is_tensor(x) and x.ndim and x.shape[0] == n else x for x in args)
        k = {key: v[lo:hi] if torch.is_tensor(v) and v.ndim and v.shape[0] == n else v for key, v in kwargs.items()}
        out = fn(*a, **k)
        return out if torch.is_tensor(out) else out.sample

    return UNetOutput(torch.cat([part(0, n // 2), part(n // 2, n)]))


class UNetOutput:
    """What a diffusers UNet call returns, as far as t3d reads it (`.sample`)."""

    __slots__ = ("sample",)

    def __init__(self, sample: torch.Tensor):
        self.sample = sample


class _PositionalUNet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class UNetTrace:
    """`unet(sample, t, encoder_hidden_states=...)` under no_grad through frozen TorchScript traces.

    A diffusers UNet spends its time on a CPU partly in Python: ~100 module calls per forward pass
    around kernels that take tens of microseconds at 32 px. A frozen trace runs the same aten
    kernels without that overhead.

    split: a batch runs as two halves (CFG's cond and uncond), the second on a worker thread. A
    trace holds the GIL only to start, so with one torch thread the halves use two cores; unlike
    a second OpenMP thread nothing spin-waits, so a busy machine loses nothing (`split_enabled`
    decides per call). A call with `halves` (compute.cfg_halves) is defined as the two half
    calls, so its halves always split; one without them splits only where the halves give the
    whole batch's bits.

    Same bits, checked at run time: the TRACE_AFTER-th call of an input layout (shapes, strides,
    dtype) runs the UNet eagerly and returns that, and keeps the trace only if it gives exactly the
    same output, and the split only if the two halves do too (they need not: oneDNN picks its
    convolutions by batch size for some layouts, e.g. channels_last renders). Earlier calls run
    eagerly, so short uses (a preview, a test, a smoke run) never pay for tracing. A call it
    cannot serve returns None and the caller runs the UNet eagerly: extra keyword arguments, grad
    mode, a layout whose check failed, weights changed in place since the trace (their version
    counters), or a failed trace.
    """

    MAX_LAYOUTS = 8
    # A layout is traced at its 20th call: deciding costs 1-1.5 s (an eager call, two traces), which
    # the 5-35 ms a traced call saves repays within ~100 calls; runs of a few steps never pay it.
    TRACE_AFTER = 20
    SERIAL_CALLS = 3  # TorchScript's executor profiles and optimises a graph in its first calls

    def __init__(self, unet: torch.nn.Module, split: bool | str = "auto"):
        self.unet = unet
        self.split = split
        self.plans: dict[tuple, dict] = {}  # layout -> {"trace", "half" (or None), "calls"}; None: eager
        self.seen: dict[tuple, int] = {}  # eager calls per layout not traced yet
        self.failed: str | None = None
        self._params = list(unet.parameters())  # walking the module tree costs 0.3 ms a call
        self._versions = self._weight_versions()
        self._pool = None
        self._pool_pid = None

    def _weight_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self._params)

    def split_enabled(self) -> bool:
        """auto: only with one torch thread on a machine with more than one core (t3d's default there)."""
        if self.split != "auto":
            return bool(self.split)
        return torch.get_num_threads() == 1 and (os.cpu_count() or 1) >= 2

    def __call__(self, sample, timestep, encoder_hidden_states=None, halves=False, **extra) -> UNetOutput | None:
        if self.failed or extra or torch.is_grad_enabled() or encoder_hidden_states is None:
            return None
        inputs = (sample, timestep, encoder_hidden_states)
        if not all(torch.is_tensor(x) for x in inputs):
            return None
        if self._weight_versions() != self._versions:
            self.plans.clear()  # weights written in place: the frozen constants are stale
            self._versions = self._weight_versions()
        if halves and not (sample.shape[0] % 2 == 0 and all(x.shape[0] == sample.shape[0] for x in inputs)):
            return None
        layout = (bool(halves), *((tuple(x.shape), x.stride(), x.dtype, x.device) for x in inputs))
        if layout not in self.plans:
            self.seen[layout] = self.seen.get(layout, 0) + 1
            if self.seen[layout] < self.TRACE_AFTER or len(self.plans) >= self.MAX_LAYOUTS:
                return None
            return self._decide(layout, inputs, halves)
        plan = self.plans[layout]
        if plan is None:
            return None
        plan["calls"] += 1
        if plan["half"] is None or (plan["trace"] is not None and not self.split_enabled()):
            return UNetOutput(plan["trace"](*inputs))  # the whole batch in one call, where that gives the bits
        first, second = _halves(inputs)
        if not self.split_enabled() or plan["calls"] <= self.SERIAL_CALLS:
            return UNetOutput(torch.cat([plan["half"](*first), plan["half"](*second)]))
        pending = self._worker().submit(_run_no_grad, plan["half"], second)
        out = plan["half"](*first)
        return UNetOutput(torch.cat([out, pending.result()]))

    def _decide(self, layout: tuple, inputs: tuple, halves: bool = False) -> UNetOutput:
        """The eager output, after deciding this layout's plan by comparing the traces with it."""
        if halves:
            first, second = _halves(inputs)
            positional = _PositionalUNet(self.unet)
            eager = torch.cat([positional(*first), positional(*second)])
            half = self._trace(first)
            plan = None
            if half is not None and torch.equal(torch.cat([half(*first), half(*second)]), eager):
                plan = {"trace": None, "half": half, "calls": 1}
            self.plans[layout] = plan
            return UNetOutput(eager)
        sample, timestep, hidden = inputs
        eager = self.unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)[0]
        plan = None
        trace = self._trace(inputs)
        if trace is not None and torch.equal(trace(*inputs), eager):
            plan = {"trace": trace, "half": None, "calls": 1}
            n = sample.shape[0]
            if n >= 2 and n % 2 == 0 and all(x.shape[0] == n for x in inputs):
                first, second = _halves(inputs)
                half = self._trace(first)
                if half is not None and torch.equal(torch.cat([half(*first), half(*second)]), eager):
                    plan["half"] = half
        elif trace is not None:
            log.debug("compute.trace: the trace differs from the UNet for inputs %s; eager there", layout)
        self.plans[layout] = plan
        return UNetOutput(eager)

    def _worker(self):
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None or self._pool_pid != os.getpid():  # a forked child has no worker thread
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="t3d-unet")
            self._pool_pid = os.getpid()
        return self._pool

    def _trace(self, inputs):
        import warnings

        was_training = self.unet.training
        try:
            self.unet.eval()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about shape arithmetic: one trace per layout
                return torch.jit.freeze(torch.jit.trace(_PositionalUNet(self.unet).eval(), inputs, check_trace=False))
        except Exception as exc:
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            log.warning("compute.trace: tracing the UNet failed (%s); running it eagerly", self.failed)
            return None
        finally:
            self.unet.train(was_training)


def _halves(inputs: tuple) -> tuple[tuple, tuple]:
    n = inputs[0].shape[0] // 2
    return tuple(x[:n] for x in inputs), tuple(x[n:] for x in inputs)


def _run_no_grad(graph, inputs):
    with torch.no_grad():  # grad mode is per thread
        return graph(*inputs)


def offloadable_modules(prior) -> list[torch.nn.Module]:
    """What `offload: encoders` keeps on the CPU: the text encoder and the VAE's decoder half."""
    mods = [prior.text_encoder]
    if prior.vae is not None:
        mods += [
            m
            for m in (getattr(prior.vae, "decoder", None), getattr(prior.vae, "post_quant_conv", None))
            if m is not None
        ]
    return [m for m in mods if isinstance(m, torch.nn.Module)]
