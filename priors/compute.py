"""flow.yaml `compute:`: how the prior runs (precision, attention, VAE, offload, layout, compile).

    compute:
      profile: low-memory     # optional shortcut; keys written beside it win over what it expands to
      precision: auto         # auto | fp32 | fp16 | bf16
      attention: sdpa         # sdpa | sliced
      vae: full               # full | sliced | tiled
      offload: none           # none | encoders
      channels_last: false
      compile: false

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
- attention, vae: sliced, offload, channels_last, compile: never (same maths; measured on the tiny
  priors in tests/test_compute.py).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("t3d")

Precision = Literal["auto", "fp32", "fp16", "bf16"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# What each `profile:` expands to. Keys the user writes beside `profile:` override these.
# low-memory leaves `attention` at sdpa: on torch >= 2 SDPA dispatches to memory-efficient or
# flash kernels that never hold the N x N attention matrix, while diffusers' sliced processor
# computes it slice by slice with baddbmm, so slicing only helps where SDPA falls back to its math
# kernel. It leaves precision at auto, which is already fp16 on CUDA for SD / IF / the toy prior
# (an explicit fp16 would give every artifact a new key for the same numbers).
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
    prior.compute = report
    return prior


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
