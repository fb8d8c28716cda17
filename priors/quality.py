"""Measured quality of a prior on the toy world: does a sample show the prompted colour and shape?

- colour: the dominant hue of the sample's foreground (pixels clearly off the white background,
  saturated enough to have a hue) must be nearest to the prompted colour's hue;
- shape: the sample's silhouette is compared (IoU) with every shape's ground-truth silhouettes
  over the camera views the prompt's suffix allows (all views without a suffix); the shape whose
  best view matches best must be the prompted one.

Toy world v2 adds two checks (`evaluate_world_v2`):
- objects with a front ("... with a black spot, front view"): the spot must show in front-view
  samples and not in back-view ones (t3d.toy.metrics.mark_visible);
- under-specified prompts ("a cube", "a red object"): 64 samples must cover every mode, each
  colour (or shape) in >= 10 % of them.
"""

from __future__ import annotations

import colorsys
from functools import lru_cache

import torch

from t3d.render.cameras import VIEW_SUFFIXES, CameraParams, make_cameras, view_names
from t3d.toy.metrics import mark_visible
from t3d.toy.world import (
    COLOURS,
    SHAPES,
    marked_prompts,
    parse_prompt,
    parse_toy_prompt,
    render_primitive,
    split_view,
    toy_prompts_with_views,
    underspecified_prompts,
)

MIN_MODE_SHARE = 0.10  # an under-specified prompt covers a mode when >= 10 % of its samples show it

BACKGROUND_THRESHOLD = 0.25  # a pixel is foreground when some channel is this far below white
MIN_SATURATION = 0.3


def foreground_mask(rgb: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [0,1] -> bool [B,H,W]: pixels clearly off the white background."""
    return (1.0 - rgb).amax(dim=1) > BACKGROUND_THRESHOLD


def _hue_sat(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hue in degrees and HSV saturation of [...,3] colours."""
    r, g, b = rgb.unbind(-1)
    mx, _ = rgb.max(-1)
    mn, _ = rgb.min(-1)
    delta = (mx - mn).clamp_min(1e-6)
    hue = (
        torch.where(mx == r, ((g - b) / delta) % 6, torch.where(mx == g, (b - r) / delta + 2, (r - g) / delta + 4))
        * 60.0
    )
    sat = (mx - mn) / mx.clamp_min(1e-6)
    return hue, sat


def _colour_hues() -> torch.Tensor:
    return torch.tensor([colorsys.rgb_to_hsv(*COLOURS[c])[0] * 360.0 for c in COLOURS])


def dominant_colour(rgb: torch.Tensor) -> list[str | None]:
    """Per image [3,H,W]: the toy colour whose hue most foreground pixels are nearest to (None if empty)."""
    names = list(COLOURS)
    ref = _colour_hues()
    fg = foreground_mask(rgb)
    out: list[str | None] = []
    for img, m in zip(rgb, fg):
        px = img.permute(1, 2, 0)[m]
        if px.shape[0] == 0:
            out.append(None)
            continue
        hue, sat = _hue_sat(px)
        hue = hue[sat > MIN_SATURATION]
        if hue.numel() == 0:
            out.append(None)
            continue
        d = (hue[:, None] - ref[None, :]).abs() % 360.0
        d = torch.minimum(d, 360.0 - d)
        votes = torch.bincount(d.argmin(dim=1), minlength=len(names))
        out.append(names[int(votes.argmax())])
    return out


@lru_cache(maxsize=16)
def reference_silhouettes(
    view: str | None, size: int, az_step: float = 10.0, el_step: float = 5.0
) -> dict[str, torch.Tensor]:
    """Ground-truth masks (bool [V,H,W]) of every shape over a grid of the camera distribution,
    keeping the cameras whose view name is `view` (all of them for None)."""
    p = CameraParams()
    az = torch.arange(p.azimuth_range[0], p.azimuth_range[1], az_step)
    el = torch.arange(p.elevation_range[0], p.elevation_range[1] + 1e-6, el_step)
    A, E = torch.meshgrid(az, el, indexing="ij")
    cams = make_cameras(A.reshape(-1), E.reshape(-1), p.radius, p.fov_deg)
    if view is not None:
        keep = torch.tensor([v == view for v in view_names(cams, p)])
        cams = make_cameras(A.reshape(-1)[keep], E.reshape(-1)[keep], p.radius, p.fov_deg)
    refs = {}
    for shape in SHAPES:
        _, mask = render_primitive(shape, "red", cams, size, supersample=2)
        refs[shape] = mask[:, 0] > 0.5
    return refs


def classify_shapes(rgb: torch.Tensor, view: str | None) -> tuple[list[str | None], torch.Tensor]:
    """Best-matching shape per image by silhouette IoU, and the IoU table [B, n_shapes]."""
    fg = foreground_mask(rgb)
    refs = reference_silhouettes(view, rgb.shape[-1])
    scores = torch.zeros(rgb.shape[0], len(SHAPES))
    for j, shape in enumerate(SHAPES):
        ref = refs[shape].float()  # [V,H,W]
        f = fg.float().flatten(1)  # [B,P]
        inter = f @ ref.flatten(1).T  # [B,V]
        union = f.sum(1, keepdim=True) + ref.flatten(1).sum(1)[None] - inter
        scores[:, j] = (inter / union.clamp_min(1)).amax(dim=1)
    names: list[str | None] = [SHAPES[int(i)] if fg[k].any() else None for k, i in enumerate(scores.argmax(dim=1))]
    return names, scores


def evaluate_prior(
    prior,
    prompts: list[str] | None = None,
    n: int = 8,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    return_images: bool = False,
) -> dict:
    """Colour and shape accuracy of `n` samples per toy prompt (all 80 suffixed prompts by default)."""
    from .sample import sample_images

    prompts = list(prompts or toy_prompts_with_views())
    images = sample_images(
        prior, prompts, n=n, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, progress=progress
    )
    per_prompt = {}
    c_ok_all, s_ok_all = 0, 0
    for i, prompt in enumerate(prompts):
        shape, colour = parse_prompt(prompt)
        _, view = split_view(prompt)
        imgs = images[i * n : (i + 1) * n]
        colours = dominant_colour(imgs)
        shapes, _ = classify_shapes(imgs, view)
        c_ok = sum(c == colour for c in colours)
        s_ok = sum(s == shape for s in shapes)
        c_ok_all += c_ok
        s_ok_all += s_ok
        per_prompt[prompt] = {"color_acc": c_ok / n, "shape_acc": s_ok / n, "colors": colours, "shapes": shapes}
    total = max(1, len(prompts) * n)
    result = {
        "color_acc": c_ok_all / total,
        "shape_acc": s_ok_all / total,
        "per_prompt": per_prompt,
        "n": n,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "prior": prior.identity,
        "chance": {"color": 1 / len(COLOURS), "shape": 1 / len(SHAPES)},
    }
    if return_images:
        result["images"] = images
    return result


def marked_gate_prompts() -> list[str]:
    """Every marked prompt from the front and from the back: the views where the spot's place is unambiguous."""
    return [p + VIEW_SUFFIXES[v] for p in marked_prompts() for v in ("front", "back")]


def evaluate_world_v2(
    prior,
    n_marked: int = 4,
    n_modes: int = 64,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """The v2 gate's two checks: the spot's placement per view, and mode coverage of under-specified prompts."""
    from .sample import sample_images

    marked = marked_gate_prompts()
    images = sample_images(
        prior, marked, n=n_marked, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, progress=progress
    )
    per_marked, ok_all = {}, 0
    for i, prompt in enumerate(marked):
        view = parse_toy_prompt(prompt).view
        shown = mark_visible(images[i * n_marked : (i + 1) * n_marked]).tolist()
        ok = sum(s == (view == "front") for s in shown)
        ok_all += ok
        per_marked[prompt] = {"mark_acc": ok / n_marked, "shown": shown}

    under = underspecified_prompts()
    images = sample_images(
        prior, under, n=n_modes, steps=steps, guidance=guidance, seed=seed + 1, batch_size=batch_size, progress=progress
    )
    per_under, covered_all = {}, True
    for i, prompt in enumerate(under):
        toy = parse_toy_prompt(prompt)
        imgs = images[i * n_modes : (i + 1) * n_modes]
        if toy.colour is None:  # "a cube": colour modes; the shape must still be right
            found = dominant_colour(imgs)
            modes = list(COLOURS)
            fixed_ok = sum(s == toy.shape for s in classify_shapes(imgs, None)[0]) / n_modes
        else:  # "a red object": shape modes; the colour must still be right
            found = classify_shapes(imgs, None)[0]
            modes = list(SHAPES)
            fixed_ok = sum(c == toy.colour for c in dominant_colour(imgs)) / n_modes
        share = {m: round(sum(f == m for f in found) / n_modes, 4) for m in modes}
        covered = all(v >= MIN_MODE_SHARE for v in share.values())
        covered_all &= covered
        per_under[prompt] = {"mode_share": share, "covered": covered, "named_attribute_acc": fixed_ok}
    return {
        "mark_acc": ok_all / max(1, len(marked) * n_marked),
        "modes_covered": covered_all,
        "min_mode_share": min(min(r["mode_share"].values()) for r in per_under.values()),
        "per_marked": per_marked,
        "per_underspecified": per_under,
        "n_marked": n_marked,
        "n_modes": n_modes,
    }
