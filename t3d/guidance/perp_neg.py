"""Perp-Neg (Armandpour et al. 2023): negative view prompts that push only perpendicular to the positive.

Plain CFG with a negative prompt subtracts its whole score, including the part it shares with the
positive prompt ("a corgi, back view" shares "a corgi" with "a corgi, front view"), so it removes
the object along with the view. Perp-Neg subtracts only the component of each negative's guidance
direction that is perpendicular to the positive's, per image:

    e_pos = eps(pos) - eps_u,  e_i = eps(neg_i) - eps_u,  perp(a, b) = a - (<a,b>/<b,b>) b
    eps   = eps_u + s (e_pos - sum_i w_i perp(e_i, e_pos))

s follows t3d's CFG convention (eps_u + s (eps_c - eps_u), see sds.CFG_CONVENTION).

For text-to-3D (the paper's DreamFusion section) the positive is the view embedding interpolated
by azimuth between front, side and back, and the negatives are the front and side embeddings,
weighted by shifted exponential decays w = a exp(-b r) + c of the interpolation factor r. The
weight numbers are threestudio's prompt-processor defaults (perp_neg_f_fs, _sf, _sb, _fsb):
    |az| < 90:  r = 1 - |az|/90, pos = r front + (1-r) side, w_front = f_fs(r), w_side = f_sf(1-r)
    |az| >= 90: r = 2 - |az|/90, pos = r side + (1-r) back,  w_front = f_fsb(r), w_side = f_sb(r)
so a front view pushes away from "side" (1.574), a side view from "front" (1.574) and a back view
from "front" (1.967) and "side" (0.394).

Overhead cameras (t3d's view_name: elevation above the overhead threshold) get the overhead
embedding as the positive and zero weights, i.e. plain CFG, as threestudio does: from above an
object has no front or back to keep apart, and the interpolation is defined on azimuth only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

ExpDecay = tuple[float, float, float]  # (a, b, c) of a exp(-b r) + c

# threestudio's defaults; each reaches ~0 at r = 1 (f(1) = a e^-b + c), where its view is the positive.
F_FS: ExpDecay = (4.0, 0.5, -2.426)  # weight of "front" between front (r=1) and side (r=0)
F_SF: ExpDecay = (4.0, 0.5, -2.426)  # weight of "side" there, as a function of 1 - r
F_SB: ExpDecay = (1.0, 0.5, -0.606)  # weight of "side" between side (r=1) and back (r=0)
F_FSB: ExpDecay = (1.0, 0.5, 0.967)  # weight of "front" there
NEGATIVE_VIEWS = ("front", "side")  # the order of the negatives in every [B, K] tensor here


def shifted_exp_decay(f: Sequence[float], r: torch.Tensor) -> torch.Tensor:
    a, b, c = (float(v) for v in f)
    return a * torch.exp(-b * r) + c


def perpendicular_component(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """a - (<a,b>/<b,b>) b for each image of the batch (dot products over all but dim 0)."""
    dims = tuple(range(1, a.ndim))
    coeff = (a * b).sum(dims, keepdim=True) / (b * b).sum(dims, keepdim=True).clamp_min(eps)
    return a - coeff * b


def perp_neg_weights(
    azimuth_deg: torch.Tensor,
    f_fs: Sequence[float] = F_FS,
    f_sf: Sequence[float] = F_SF,
    f_sb: Sequence[float] = F_SB,
    f_fsb: Sequence[float] = F_FSB,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per camera: the positive's mix over (front, side, back) [B,3] and the weights of the
    negatives (front, side) [B,2], both from the azimuth alone."""
    az = ((azimuth_deg.double() + 180.0) % 360.0 - 180.0).abs()  # |az| in [0, 180]
    front_half = az < 90.0
    r = torch.where(front_half, 1.0 - az / 90.0, 2.0 - az / 90.0)
    zero = torch.zeros_like(r)
    mix = torch.where(
        front_half[:, None],
        torch.stack([r, 1.0 - r, zero], -1),
        torch.stack([zero, r, 1.0 - r], -1),
    )
    weights = torch.where(
        front_half[:, None],
        torch.stack([shifted_exp_decay(f_fs, r), shifted_exp_decay(f_sf, 1.0 - r)], -1),
        torch.stack([shifted_exp_decay(f_fsb, r), shifted_exp_decay(f_sb, r)], -1),
    )
    return mix.float(), weights.float()


@dataclass
class PerpNegTerms:
    """The negatives of a batch: embeddings [B,K,L,D] and their weights [B,K]."""

    negatives: torch.Tensor
    weights: torch.Tensor

    def repeat(self, k: int) -> PerpNegTerms:
        """The same terms for a batch tiled k times (SJC's noise draws)."""
        return PerpNegTerms(self.negatives.repeat(k, 1, 1, 1), self.weights.repeat(k, 1))


def perp_neg_embeddings(
    views: Mapping[str, torch.Tensor],
    azimuth_deg: torch.Tensor,
    overhead: Sequence[bool],
    f_fs: Sequence[float] = F_FS,
    f_sf: Sequence[float] = F_SF,
    f_sb: Sequence[float] = F_SB,
    f_fsb: Sequence[float] = F_FSB,
) -> tuple[torch.Tensor, PerpNegTerms]:
    """The positive embeddings [B,L,D] and the negatives for cameras at `azimuth_deg`.

    `views` is encode_prompt's view name -> [1,L,D] (PromptEmbeddings.views); `overhead[i]` says
    camera i is an overhead view (positive: the overhead embedding, weights zero)."""
    missing = [v for v in ("front", "side", "back") if v not in views]
    if missing:
        raise ValueError(
            f"perp_neg needs the front, side and back view embeddings; encode_prompt.views lacks {missing}"
        )
    front, side, back = views["front"], views["side"], views["back"]
    mix, weights = perp_neg_weights(azimuth_deg.detach().cpu(), f_fs, f_sf, f_sb, f_fsb)
    mix, weights = mix.to(front.device, front.dtype), weights.to(front.device)
    basis = torch.cat([front, side, back])  # [3, L, D]
    positive = torch.einsum("bv,vld->bld", mix, basis)
    is_overhead = torch.as_tensor(list(overhead), dtype=torch.bool, device=front.device)
    if bool(is_overhead.any()):
        if "overhead" not in views:
            raise ValueError("perp_neg with overhead cameras needs encode_prompt.views to include 'overhead'")
        positive = torch.where(is_overhead[:, None, None], views["overhead"].to(positive.dtype), positive)
        weights = torch.where(is_overhead[:, None], torch.zeros_like(weights), weights)
    b = positive.shape[0]
    negatives = torch.stack([views[name][0] for name in NEGATIVE_VIEWS])[None].expand(b, -1, -1, -1)
    return positive, PerpNegTerms(negatives, weights)


def perp_neg_combine(
    eps_uncond: torch.Tensor,
    eps_pos: torch.Tensor,
    eps_negs: torch.Tensor,
    weights: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """eps_u + s (e_pos - sum_i w_i perp(e_i, e_pos)); eps_negs [B,K,...], weights [B,K]."""
    e_pos = eps_pos - eps_uncond
    push = torch.zeros_like(e_pos)
    for i in range(eps_negs.shape[1]):
        w = weights[:, i].to(e_pos.dtype).view(-1, *([1] * (e_pos.ndim - 1)))
        push = push + w * perpendicular_component(eps_negs[:, i] - eps_uncond, e_pos)
    return eps_uncond + guidance_scale * (e_pos - push)


def predict_noise_perp_neg(
    prior,
    x_t: torch.Tensor,
    t: torch.Tensor,
    positive: torch.Tensor,
    uncond: torch.Tensor,
    terms: PerpNegTerms,
    guidance_scale: float,
    unet=None,
    **unet_kwargs,
) -> torch.Tensor:
    """Perp-Neg's noise prediction: one batched UNet call over [uncond, pos, neg_1..neg_K]."""
    b, k = x_t.shape[0], terms.negatives.shape[1]
    n = k + 2
    negatives = terms.negatives.to(positive.device, positive.dtype).transpose(0, 1).reshape(k * b, *positive.shape[1:])
    context = torch.cat([uncond.to(positive.dtype), positive, negatives])
    t = t.to(x_t.device)
    if t.ndim == 0:
        t = t.expand(b)
    tiled = {key: torch.cat([v] * n) if torch.is_tensor(v) else v for key, v in unet_kwargs.items()}
    eps = prior.predict_noise(
        torch.cat([x_t] * n), torch.cat([t] * n), context, None, guidance_scale=1.0, unet=unet, **tiled
    ).float()
    eps = eps.view(n, b, *x_t.shape[1:])
    return perp_neg_combine(eps[0], eps[1], eps[2:].transpose(0, 1), terms.weights.to(eps.device), guidance_scale)
