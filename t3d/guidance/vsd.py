"""ProlificDreamer's Variational Score Distillation: a camera-conditioned LoRA of the prior's UNet.

The LoRA branch learns the score of the *current* renders (the variational distribution), and
the field follows w(t) (eps_pretrained_cfg - eps_lora): toward the prompt, away from what it
already renders. As in the paper and threestudio, the camera enters the LoRA UNet as a class
embedding added to the timestep embedding (c2w flattened to 16 numbers through a small MLP), and
is dropped part of the time while the LoRA trains so it also learns the camera-free score.
The pretrained UNet is never modified: the LoRA branch is a copy of its modules that shares its
frozen base weights (no second copy of them in memory).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from t3d.guidance.perp_neg import PerpNegTerms
from t3d.guidance.sds import _clip, _expand, _reparam_loss, guided_noise, sample_timesteps, sds_weight

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class CameraEmbedding(nn.Module):
    """c2w [B,16] -> the UNet's time-embedding width. The last layer starts at zero, so a fresh
    LoRA UNet predicts exactly what the pretrained one does."""

    def __init__(self, out_dim: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, camera: torch.Tensor) -> torch.Tensor:
        return self.net(camera.to(self.net[0].weight.dtype))


def camera_condition(c2w: torch.Tensor) -> torch.Tensor:
    """[B,4,4] camera-to-world -> [B,16] (the LoRA UNet's class label)."""
    return c2w.reshape(c2w.shape[0], 16).float()


def make_lora_unet(unet: nn.Module, rank: int = 4, alpha: float | None = None, camera: bool = True) -> nn.Module:
    """A copy of `unet` with peft LoRA adapters on its attention projections and a camera embedding.

    Only the adapters and the camera MLP are trainable (kept in float32 even under fp16 weights).
    The copy shares the frozen base weights with `unet` (same tensors, nothing is written to them):
    a full copy would double the prior's largest weights (3.5 GB more for SD 2.1 in fp32).
    """
    from peft import LoraConfig

    shared = {id(p): p for p in unet.parameters() if not p.requires_grad}
    lora = copy.deepcopy(unet, memo=shared)
    lora.requires_grad_(False)
    lora.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    if camera:
        time_dim = lora.time_embedding.linear_2.out_features
        lora.class_embedding = CameraEmbedding(time_dim).to(next(unet.parameters()).device)
    for p in trainable_parameters(lora):
        p.data = p.data.float()
    return lora


def make_lora_branch(prior, rank: int, lr: float, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """VSD's LoRA branch of `prior` and its AdamW (no weight decay), as refine and texture train it.
    The adapters' random init draws from `seed` inside a forked RNG, so the global stream is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        lora = make_lora_unet(prior.unet, rank=rank)
    return lora, torch.optim.AdamW(trainable_parameters(lora), lr=lr, weight_decay=0.0)


def trainable_parameters(lora_unet: nn.Module) -> list[nn.Parameter]:
    named = trainable_state_names(lora_unet)
    params = dict(lora_unet.named_parameters())
    for name in named:
        params[name].requires_grad_(True)
    return [params[n] for n in named]


def trainable_state_names(lora_unet: nn.Module) -> list[str]:
    return [n for n, _ in lora_unet.named_parameters() if "lora_" in n or n.startswith("class_embedding.")]


def lora_state(lora_unet: nn.Module) -> dict[str, torch.Tensor]:
    """Only what VSD trains (adapters + camera MLP): what goes into checkpoints and artifacts."""
    params = dict(lora_unet.named_parameters())
    return {n: params[n].detach() for n in trainable_state_names(lora_unet)}


def load_lora_state(lora_unet: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(lora_unet.named_parameters())
    missing = set(trainable_state_names(lora_unet)) - set(state)
    if missing:
        raise KeyError(f"LoRA state lacks {sorted(missing)[:3]}...")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def vsd_loss(
    prior,
    lora_unet: nn.Module,
    rgb: torch.Tensor,
    c2w: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    guidance_scale: float = 7.5,
    lora_guidance_scale: float = 1.0,
    t_range=(0.02, 0.98),
    weighting: str = "sds",
    grad_clip: float | None = None,
    generator: torch.Generator | None = None,
    lora_cond: torch.Tensor | None = None,
    perp_neg: PerpNegTerms | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The field's VSD loss on renders, plus the model-space renders for the LoRA's own loss.

    lora_cond: the LoRA branch's text condition (None: `cond`), e.g. the view-independent prompt
    while the pretrained branch gets per-view ones. perp_neg: Perp-Neg on the pretrained branch
    only (cond is then its interpolated positive); the LoRA models the renders, not the prompt."""
    x = prior.images_to_model(rgb).float()
    b = x.shape[0]
    t = sample_timesteps(b, t_range, prior.num_train_timesteps, generator).to(x.device)
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    alphas = prior.alphas_cumprod.to(x.device)[t].view(-1, 1, 1, 1)
    camera = camera_condition(c2w).to(x.device)
    with torch.no_grad():
        x_t = alphas.sqrt() * x.detach() + (1 - alphas).sqrt() * noise
        eps_pretrained = guided_noise(
            prior, x_t, t, _expand(cond, b), _expand(uncond, b), guidance_scale, perp_neg
        ).float()
        eps_lora = prior.predict_noise(
            x_t,
            t,
            _expand(cond if lora_cond is None else lora_cond, b),
            _expand(uncond, b),
            guidance_scale=lora_guidance_scale,
            unet=lora_unet,
            class_labels=camera.to(prior.dtype),
        ).float()
        grad = _clip(sds_weight(alphas, weighting) * (eps_pretrained - eps_lora), grad_clip)
    return _reparam_loss(x, grad), x.detach(), {"t": t.cpu(), "grad_norm": float(grad.norm())}


def lora_loss(
    prior,
    lora_unet: nn.Module,
    x0: torch.Tensor,
    c2w: torch.Tensor,
    cond: torch.Tensor,
    *,
    camera_dropout: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The standard diffusion loss of the LoRA branch on the current renders (t over the full range)."""
    b = x0.shape[0]
    t = torch.randint(0, prior.num_train_timesteps, (b,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = prior.add_noise(x0, noise, t)
    camera = camera_condition(c2w).to(x0.device)
    keep = (torch.rand(b, generator=generator) >= camera_dropout).to(x0.device, camera.dtype).view(-1, 1)
    pred = prior.predict_noise(
        x_t, t, _expand(cond, b), None, unet=lora_unet, class_labels=(camera * keep).to(prior.dtype)
    ).float()
    return F.mse_loss(pred, noise)
