"""The one prior interface every stage uses, whatever model is behind it.

A prior is a text-conditioned epsilon-prediction diffusion model with a DDPM schedule. Stages
never touch diffusers classes directly: they encode text, move renders into the model's space,
and ask for (CFG-combined) noise predictions. The embedded toy prior, Stable Diffusion 1.x/2.x
(latent space, VAE) and DeepFloyd IF stage I (pixel space) all sit behind this class.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .compute import call_in_halves

_log = logging.getLogger("t3d")


@dataclass
class DiffusionPrior:
    """A loaded prior. `identity` goes into artifact keys: same identity, same model weights."""

    identity: str
    space: Literal["pixel", "latent"]
    image_size: int  # renders are resized to this many pixels before entering the model
    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler: Any
    vae: torch.nn.Module | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    default_guidance_scale: float = 7.5
    extra: dict = field(default_factory=dict)
    # flow.yaml `compute:` as applied (priors/compute.py apply_compute), for manifests
    compute: dict = field(default_factory=dict)
    # offload: where the text encoder and the VAE's decoder wait between calls (None: no offload)
    offload_device: torch.device | None = None
    # compute.compile: torch.compile(unet), sharing its weights; dropped (eager) if it ever fails
    compiled_unet: Any = None
    # compute.trace: frozen TorchScript traces of the UNet for no-grad calls (priors/compute.py UNetTrace)
    traced_unet: Any = None
    # compute.cfg_halves: CFG's cond and uncond halves as two UNet calls (priors/compute.py)
    cfg_halves: bool = False

    # ---- schedule -------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(self.device, torch.float32)

    # ---- text -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Token-level embeddings [B, L, D] for cross-attention (the empty string is the unconditional)."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        kwargs = {}
        if self.extra.get("text_attention_mask"):  # DeepFloyd IF's T5 masks its padding
            kwargs["attention_mask"] = tokens.attention_mask.to(self.device)
        with self.visiting(self.text_encoder):
            out = self.text_encoder(tokens.input_ids.to(self.device), **kwargs)
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        return hidden.to(self.dtype)

    # ---- image space ----------------------------------------------------------------------
    def images_to_model(self, rgb: torch.Tensor) -> torch.Tensor:
        """Renders [B,3,H,W] in [0,1] -> model inputs, differentiably (resize, [-1,1], VAE if latent)."""
        x = rgb.to(self.dtype)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x,
                (self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=x.shape[-1] > self.image_size,
            )
        x = x * 2.0 - 1.0
        if self.space == "latent":
            posterior = self.vae.encode(x).latent_dist
            x = posterior.sample() * self.vae.config.scaling_factor
        return x

    @torch.no_grad()
    def model_to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space samples -> RGB [B,3,H,W] in [0,1]."""
        if self.space == "latent":
            with self.visiting(self.vae.decoder, self.vae.post_quant_conv):
                x = self.vae.decode(x / self.vae.config.scaling_factor).sample
        return ((x.float() + 1.0) / 2.0).clamp(0, 1)

    @contextlib.contextmanager
    def visiting(self, *modules):
        """With `offload: encoders`, move offloaded modules to the device for one call and back."""
        modules = [m for m in modules if isinstance(m, torch.nn.Module)]
        if self.offload_device is None or not modules:
            yield
            return
        for m in modules:
            m.to(self.device)
        try:
            yield
        finally:
            for m in modules:
                m.to(self.offload_device)

    # ---- noise prediction -----------------------------------------------------------------
    def predict_noise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        unet: torch.nn.Module | None = None,
        **unet_kwargs,
    ) -> torch.Tensor:
        """Epsilon prediction with classifier-free guidance: one batched UNet call for cond+uncond,
        or two calls, one per half, with `compute.cfg_halves` (priors/compute.py says why).

        `unet` lets VSD query a LoRA-adapted copy; `unet_kwargs` pass e.g. class_labels (camera).
        """
        net = unet if unet is not None else self.unet
        t = t.to(self.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        x_t = x_t.to(self.dtype)
        if uncond is None or guidance_scale == 1.0:
            out = self._unet_call(net, x_t, t, encoder_hidden_states=cond.to(self.dtype), **unet_kwargs).sample
            return self._eps(out, x_t, t)
        out = self._unet_call(
            net,
            torch.cat([x_t, x_t]),
            torch.cat([t, t]),
            encoder_hidden_states=torch.cat([cond, uncond]).to(self.dtype),
            halves=self.cfg_halves and net is self.unet,
            **{k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in unet_kwargs.items()},
        ).sample
        out = self._eps(out, torch.cat([x_t, x_t]), torch.cat([t, t]))
        eps_cond, eps_uncond = out.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    def _unet_call(self, net, *args, halves: bool = False, **kwargs):
        """net(*args, **kwargs), through the compiled UNet when compute.compile gave one, else through
        compute.trace's frozen trace where it serves the call (no grad; same bits). `halves`: the
        batch's two halves as two calls (compute.cfg_halves). A compiled call that raises
        (inductor, a missing compiler) is retried eagerly, with one warning, and the compiled UNet
        is dropped for good; an error the eager UNet repeats is raised as is."""
        if net is self.unet and self.compiled_unet is not None:
            try:
                return (
                    call_in_halves(self.compiled_unet, args, kwargs) if halves else self.compiled_unet(*args, **kwargs)
                )
            except Exception as exc:
                self.compiled_unet = None
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                self.compute["compile"] = f"failed, eager: {type(exc).__name__}: {first}"
                _log.warning(
                    "compute.compile: the compiled UNet failed (%s: %s); running it uncompiled from now on",
                    type(exc).__name__,
                    first,
                )
        if net is self.unet and self.traced_unet is not None:
            out = self.traced_unet(*args, halves=halves, **kwargs)
            if out is not None:
                return out
        return call_in_halves(net, args, kwargs) if halves else net(*args, **kwargs)

    def _eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        # DeepFloyd IF predicts (eps, variance) stacked on channels: keep eps.
        if out.shape[1] == 2 * x_t.shape[1]:
            out = out[:, : x_t.shape[1]]
        # v-prediction models (e.g. SD 2.x at 768 px): eps = sqrt(a) * v + sqrt(1 - a) * x_t.
        if t is not None and getattr(self.scheduler.config, "prediction_type", "epsilon") == "v_prediction":
            a = self.alphas_cumprod[t.long()].view(-1, *([1] * (x_t.ndim - 1))).to(out.dtype)
            out = a.sqrt() * out + (1 - a).sqrt() * x_t
        return out

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t.long()].view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise
