"""Score distillation losses on renders, and the DreamFusion/threestudio regularizers.

SDS (DreamFusion): x = model-space render, t ~ U[t_min, t_max], x_t = sqrt(a) x + sqrt(1-a) eps,
grad = w(t) (eps_hat(x_t; y, t) - eps) with classifier-free guidance and NO backprop through the
UNet; written as loss = 0.5 ||x - stopgrad(x - grad)||^2 / B so that d loss / d x = grad / B.

SJC (Score Jacobian Chaining, Wang et al. 2023), Perturb-and-Average Scoring on the DDPM
(epsilon) prior in its variance-exploding view: sigma = sqrt((1-a)/a), z = x + sigma n,
x_t = sqrt(a) z, D(z) = z - sigma eps_hat(x_t, t); PAAS averages D over several noise draws.
The image gradient is (mean_k D_k - x) / sigma (the repo's variance-reduced form, i.e. the
score times sigma), and sigma is drawn uniformly from the discrete schedule with the extremes cut
(the reference uses ticks 30..-10 of 1000: t in about [10, 969]).

The regularizers take plain tensors (volume.render's outputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import AfterValidator

from t3d.guidance.perp_neg import PerpNegTerms, predict_noise_perp_neg

Weighting = Literal["sds", "uniform", "fantasia"]

# The classifier-free guidance convention of every `guidance_scale` key, said once for all of them.
CFG_CONVENTION = (
    "diffusers' form eps_u + s (eps_c - eps_u); threestudio and the DreamFusion paper write "
    "eps_c + w (eps_c - eps_u), so s = w + 1: a threestudio guidance_scale of 100 is 101 here, 7.5 is 8.5"
)


def _check_t_range(value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = value
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(
            f"a timestep range is [low, high] with 0 <= low < high <= 1, e.g. [0.02, 0.98]; got [{lo}, {hi}]"
        )
    return value


TRange = Annotated[tuple[float, float], AfterValidator(_check_t_range)]  # flow.yaml's t_range keys


def sample_timesteps(
    n: int, t_range: Sequence[float], num_train_timesteps: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Integer timesteps [n], uniform in [int(T*t_min), int(T*t_max)] (threestudio's convention)."""
    lo = int(num_train_timesteps * float(t_range[0]))
    hi = int(num_train_timesteps * float(t_range[1]))
    lo, hi = max(lo, 0), min(max(hi, lo), num_train_timesteps - 1)
    return torch.randint(lo, hi + 1, (n,), generator=generator)


def anneal_t_range(
    step: int,
    total: int,
    start: Sequence[float] = (0.02, 0.98),
    end: Sequence[float] | None = None,
    kind: Literal["linear", "sqrt", "none"] = "linear",
) -> tuple[float, float]:
    """The timestep range at `step` of `total`: interpolates start -> end (the annealing hook)."""
    if end is None or kind == "none" or total <= 1:
        return float(start[0]), float(start[1])
    f = min(max(step / (total - 1), 0.0), 1.0)
    if kind == "sqrt":
        f = math.sqrt(f)
    return tuple(float(a + (b - a) * f) for a, b in zip(start, end))  # type: ignore[return-value]


def sds_weight(alphas: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    if weighting == "sds":
        return 1.0 - alphas
    if weighting == "uniform":
        return torch.ones_like(alphas)
    if weighting == "fantasia":
        return alphas.sqrt() * (1.0 - alphas)
    raise ValueError(f"unknown weighting {weighting!r}: use sds, uniform or fantasia")


def _reparam_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 ||x - sg(x - grad)||^2 / B: its gradient w.r.t. x is grad / B."""
    target = (x - grad).detach()
    return 0.5 * F.mse_loss(x, target, reduction="sum") / x.shape[0]


def _clip(grad: torch.Tensor, grad_clip: float | None) -> torch.Tensor:
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if grad_clip is not None and grad_clip > 0:
        grad = grad.clamp(-grad_clip, grad_clip)
    return grad


def _expand(cond: torch.Tensor, b: int) -> torch.Tensor:
    return cond.expand(b, -1, -1) if cond.shape[0] == 1 and b > 1 else cond


def guided_noise(prior, x_t, t, cond, uncond, scale, perp_neg: PerpNegTerms | None = None, **unet_kwargs):
    """The CFG noise prediction, or Perp-Neg's when `perp_neg` holds negatives (cond is then the
    interpolated positive)."""
    if perp_neg is None:
        return prior.predict_noise(x_t, t, cond, uncond, guidance_scale=scale, **unet_kwargs)
    if uncond is None:
        raise ValueError("perp_neg needs the unconditional embedding")
    return predict_noise_perp_neg(prior, x_t, t, cond, uncond, perp_neg, scale, **unet_kwargs)


def _prepare(prior, rgb, guidance_scale, t_range, generator, t):
    """Shared by SDS and SJC: the guidance scale, the renders in model space, the timesteps."""
    scale = prior.default_guidance_scale if guidance_scale is None else guidance_scale
    x = prior.images_to_model(rgb).float()
    if t is None:
        t = sample_timesteps(x.shape[0], t_range, prior.num_train_timesteps, generator)
    return scale, x, t.to(x.device).long()


def sds_loss(
    prior,
    rgb: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    guidance_scale: float | None = None,
    t_range: Sequence[float] = (0.02, 0.98),
    weighting: Weighting = "sds",
    grad_clip: float | None = None,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    noise_baseline: bool = True,
    perp_neg: PerpNegTerms | None = None,
) -> tuple[torch.Tensor, dict]:
    """DreamFusion's SDS loss for renders rgb [B,3,H,W] in [0,1]; cond/uncond [B or 1, L, D].

    noise_baseline=False is DreamFusion's ablation: grad = w(t) eps_hat, without subtracting the
    injected noise (the baseline that cancels its variance). perp_neg: Perp-Neg guidance."""
    scale, x, t = _prepare(prior, rgb, guidance_scale, t_range, generator, t)
    b = x.shape[0]
    if noise is None:
        noise = torch.randn(x.shape, generator=generator).to(x.device)
    alphas = prior.alphas_cumprod.to(x.device)[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        x_t = alphas.sqrt() * x.detach() + (1 - alphas).sqrt() * noise
        eps_hat = guided_noise(
            prior, x_t, t, _expand(cond, b), None if uncond is None else _expand(uncond, b), scale, perp_neg
        ).float()
        residual = eps_hat - noise if noise_baseline else eps_hat
        grad = _clip(sds_weight(alphas, weighting) * residual, grad_clip)
    loss = _reparam_loss(x, grad)
    return loss, {"t": t.detach().cpu(), "grad_norm": float(grad.norm()), "guidance_scale": float(scale)}


def sjc_loss(
    prior,
    rgb: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    guidance_scale: float | None = None,
    t_range: Sequence[float] = (0.01, 0.97),
    n_noise: int = 1,
    var_red: bool = True,
    grad_clip: float | None = None,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    perturb: bool = True,
    perp_neg: PerpNegTerms | None = None,
) -> tuple[torch.Tensor, dict]:
    """SJC's Perturb-and-Average Scoring chained through the renderer (ascends log p).

    perturb=False scores the clean render itself (z = x, no noise, one draw): D(x, sigma) =
    x - sigma eps_hat(sqrt(a) x, t), the out-of-distribution input PAAS exists to avoid.
    perp_neg: Perp-Neg guidance."""
    scale, x, t = _prepare(prior, rgb, guidance_scale, t_range, generator, t)
    b = x.shape[0]
    a = prior.alphas_cumprod.to(x.device)[t].view(-1, 1, 1, 1)
    sigma = ((1 - a) / a).sqrt()
    with torch.no_grad():
        y = x.detach()
        if perturb:
            k = int(n_noise)
            noise = torch.randn((k,) + tuple(x.shape), generator=generator).to(x.device)  # [K,B,...]
            z = y[None] + sigma[None] * noise
        else:
            k, z = 1, y[None]
        x_t = (a.sqrt()[None] * z).flatten(0, 1)
        tt = t.repeat(k)
        c = _expand(cond, b).repeat(k, 1, 1)
        u = None if uncond is None else _expand(uncond, b).repeat(k, 1, 1)
        terms = None if perp_neg is None else perp_neg.repeat(k)
        eps_hat = guided_noise(prior, x_t, tt, c, u, scale, terms).float().view_as(z)
        denoised = z - sigma[None] * eps_hat  # D(z, sigma), [K,B,...]
        if var_red:
            score_sigma = (denoised.mean(0) - y) / sigma
        else:
            score_sigma = ((denoised - z) / sigma[None]).mean(0)
        grad = _clip(-score_sigma, grad_clip)  # descent direction on x
    loss = _reparam_loss(x, grad)
    return loss, {
        "t": t.detach().cpu(),
        "sigma": sigma.flatten().cpu(),
        "grad_norm": float(grad.norm()),
        "guidance_scale": float(scale),
    }


def guidance_loss(method: Literal["sds", "sjc"], prior, rgb, cond, uncond, **kwargs) -> tuple[torch.Tensor, dict]:
    """Dispatch by name; kwargs that the chosen method does not take are ignored."""
    if method == "sds":
        allowed = {"guidance_scale", "t_range", "weighting", "grad_clip", "generator", "t", "noise"}
        allowed |= {"noise_baseline", "perp_neg"}
        return sds_loss(prior, rgb, cond, uncond, **{k: v for k, v in kwargs.items() if k in allowed})
    if method == "sjc":
        allowed = {"guidance_scale", "t_range", "n_noise", "var_red", "grad_clip", "generator", "t"}
        allowed |= {"perturb", "perp_neg"}
        return sjc_loss(prior, rgb, cond, uncond, **{k: v for k, v in kwargs.items() if k in allowed})
    raise ValueError(f"unknown guidance method {method!r}: use sds or sjc")


# ---- regularizers ---------------------------------------------------------------------------


def orientation_loss(
    weights: torch.Tensor, normals: torch.Tensor, ray_dirs: torch.Tensor, n_rays: int | None = None
) -> torch.Tensor:
    """DreamFusion's orientation penalty: sum_i sg(w_i) max(0, n_i . d)^2, averaged over rays.

    weights [R,S], normals [R,S,3] (outward), ray_dirs [R,3] (from the camera): a visible normal
    pointing away from the camera (n.d > 0) is penalised.
    """
    facing = (normals * ray_dirs[:, None, :]).sum(-1).clamp_min(0.0)
    total = (weights.detach() * facing.square()).sum()
    return total / max(int(n_rays if n_rays is not None else weights.shape[0]), 1)


def opacity_sparsity(opacity: torch.Tensor, kind: Literal["l1", "sqrt"] = "sqrt") -> torch.Tensor:
    """Mean opacity (l1) or threestudio's smooth version mean(sqrt(o^2 + 0.01))."""
    if kind == "l1":
        return opacity.mean()
    return (opacity.square() + 0.01).sqrt().mean()


def opacity_entropy(opacity: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Binary entropy of the opacity, -(o log o + (1-o) log(1-o)): pushes pixels to 0 or 1."""
    o = opacity.clamp(eps, 1 - eps)
    return -(o * o.log() + (1 - o) * (1 - o).log()).mean()


def emptiness_loss(weights: torch.Tensor, scale: float = 10.0) -> torch.Tensor:
    """SJC's emptiness prior: mean log(1 + scale * w) over samples."""
    return torch.log1p(scale * weights).mean()
