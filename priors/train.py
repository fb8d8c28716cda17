"""Reproducible training of the embedded toy prior: regenerate the data set, train, save, sample.

    from t3d.priors.train import TrainConfig, train_toy_prior
    train_toy_prior(TrainConfig(seed=0), out="priors/embedded")

The shipped weights in priors/embedded/ are the output of this function with the defaults
(see priors/embedded/README.md). A fixed number of steps (not a time budget) keeps it
reproducible: the same seed on the same software gives the same weights on a CPU.

Data: every toy shape is rendered from `views_per_shape` cameras drawn from the NeRF stages'
distribution (CameraParams defaults + sample_cameras), 2x supersampled; shading is colour-free
so each view can be painted any toy colour on the fly (the render is linear in the colour).
Prompts are "a <colour> <shape>" plus the view suffix that t3d.render.cameras.view_name gives for the
camera (sometimes dropped, so plain prompts work), and the empty prompt with probability
`cond_dropout` (classifier-free guidance).

Toy world v2 (t3d.toy.world): with probability `mark_prob` the object carries its front spot and
the prompt says "with a black spot"; with `drop_colour_prob` / `drop_shape_prob` the prompt leaves
the colour out ("a cube") or the shape ("a red object"), so those prompts have several modes, drawn
uniformly as the data is.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from t3d.render.cameras import VIEW_SUFFIXES, CameraParams, sample_cameras, view_names
from t3d.toy.world import (
    COLOURS,
    MARK_COLOUR,
    SHAPES,
    ToyPrompt,
    marked_prompts,
    render_primitive,
    toy_prompts,
    underspecified_prompts,
)

from .toy import (
    build_toy_scheduler,
    build_toy_text_encoder,
    build_toy_tokenizer,
    build_toy_unet,
    encode_tokens,
    save_toy_folder,
)


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 8000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    image_size: int = 32
    views_per_shape: int = 3000
    supersample: int = 2
    cond_dropout: float = 0.1
    no_suffix_prob: float = 0.15
    mark_prob: float = 0.35  # the object has its front spot and the prompt says so
    drop_colour_prob: float = 0.12  # "a cube": colour left out of the prompt
    drop_shape_prob: float = 0.12  # "a red object": shape left out of the prompt
    min_snr_gamma: float = 5.0  # Min-SNR-5 loss weighting (0 = plain epsilon MSE)
    ema_decay: float = 0.999
    sample_steps: int = 50
    guidance_scale: float = 7.5  # for samples.png and the prior's default
    max_minutes: float | None = None  # safety stop only: a run cut short is not the reproducible one
    text_time_embedding: bool = True  # the prompt also reaches every ResNet block (see toy_unet_config)
    threads: int = 2  # fixed thread count: same seed + same threads -> same weights on a CPU


def sample_grid_prompts() -> list[str]:
    """samples.png's rows: every base prompt (front view), one marked prompt per shape from the
    front and from the back, and the under-specified prompts without a suffix."""
    marked = marked_prompts()[:: len(COLOURS)]
    return (
        [p + VIEW_SUFFIXES["front"] for p in toy_prompts()]
        + [p + VIEW_SUFFIXES[v] for p in marked for v in ("front", "back")]
        + underspecified_prompts()
    )


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def render_dataset(cfg: TrainConfig, generator: torch.Generator, chunk: int = 250) -> dict:
    """Per shape: colour-free shading of the body S and of the front spot K, coverage M [N,1,H,W]
    and view names, so that a view in colour c is c*S + (1-M) (white background), or
    c*S + m*K + (1-M) with the spot in colour m."""
    params = CameraParams()
    data = {}
    for shape in SHAPES:
        cams = sample_cameras(params, cfg.views_per_shape, generator=generator)
        shade, spot, cover = [], [], []
        for i in range(0, len(cams), chunk):
            sl = slice(i, i + chunk)
            sub = type(cams)(cams.azimuth[sl], cams.elevation[sl], cams.radius[sl], cams.fov_deg, cams.c2w[sl])
            white, black = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
            kw = dict(supersample=cfg.supersample)
            rgb, mask = render_primitive(shape, white, sub, cfg.image_size, mark=black, **kw)
            rgb_spot, _ = render_primitive(shape, black, sub, cfg.image_size, mark=white, **kw)
            cover.append(mask)
            shade.append(rgb[:, :1] - 1.0 + mask)
            spot.append(rgb_spot[:, :1] - 1.0 + mask)
        data[shape] = {
            "shade": torch.cat(shade),
            "spot": torch.cat(spot),
            "cover": torch.cat(cover),
            "views": view_names(cams, params),
        }
    return data


def make_batch(data: dict, cfg: TrainConfig, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """A random batch: images in [-1,1] and their prompts (some suffix-free, some empty)."""
    b = cfg.batch_size
    colour_names = list(COLOURS)
    colours = torch.tensor([COLOURS[c] for c in colour_names])
    s_idx = torch.randint(len(SHAPES), (b,), generator=generator).tolist()
    c_idx = torch.randint(len(colour_names), (b,), generator=generator).tolist()
    v_idx = torch.randint(cfg.views_per_shape, (b,), generator=generator).tolist()
    u = torch.rand(b, 4, generator=generator).tolist()
    mark_rgb = torch.tensor(MARK_COLOUR).view(3, 1, 1)
    images, prompts = [], []
    for s, c, v, (u_drop, u_suffix, u_mark, u_under) in zip(s_idx, c_idx, v_idx, u):
        d = data[SHAPES[s]]
        marked = u_mark < cfg.mark_prob
        body = d["shade"][v] if marked else d["shade"][v] + d["spot"][v]
        image = colours[c].view(3, 1, 1) * body + (1.0 - d["cover"][v])
        if marked:
            image = image + mark_rgb * d["spot"][v]
        images.append(image)
        if u_drop < cfg.cond_dropout:
            prompts.append("")
            continue
        drop_colour = u_under < cfg.drop_colour_prob
        drop_shape = cfg.drop_colour_prob <= u_under < cfg.drop_colour_prob + cfg.drop_shape_prob
        toy = ToyPrompt(None if drop_shape else SHAPES[s], None if drop_colour else colour_names[c], marked)
        prompts.append(toy.text(None if u_suffix < cfg.no_suffix_prob else d["views"][v]))
    return torch.stack(images) * 2.0 - 1.0, prompts


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1.0 - decay)


def train_toy_prior(
    cfg: TrainConfig | None = None, out="priors/embedded", device: str = "auto", progress: bool = True
) -> Path:
    """Regenerate the toy data set and train the embedded prior from `cfg.seed`; writes the
    diffusers folder to `out` plus samples.png (a grid of DDIM/CFG samples for every base prompt)."""
    cfg = cfg or TrainConfig()
    dev = pick_device(device)
    threads_before = torch.get_num_threads()
    if dev.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, out, dev, progress)
    finally:
        torch.set_num_threads(threads_before)


def _train(cfg: TrainConfig, out, dev: torch.device, progress: bool) -> Path:
    from tqdm.auto import tqdm

    t_start = time.time()
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    data = render_dataset(cfg, gen)
    t_data = time.time() - t_start

    tokenizer = build_toy_tokenizer()
    text_encoder = build_toy_text_encoder(len(tokenizer)).to(dev)
    unet = build_toy_unet(cfg.image_size, cfg.text_time_embedding).to(dev)
    scheduler = build_toy_scheduler()
    ema_te, ema_unet = copy.deepcopy(text_encoder).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    acp = scheduler.alphas_cumprod.to(dev)
    snr = acp / (1 - acp)
    loss_w = snr.clamp(max=cfg.min_snr_gamma) / snr if cfg.min_snr_gamma else torch.ones_like(snr)

    bar = tqdm(range(cfg.steps), desc="training toy prior", unit="step", disable=not progress, mininterval=2.0)
    losses = []
    stopped_early = False
    for step in bar:
        x0, prompts = make_batch(data, cfg, gen)
        x0 = x0.to(dev)
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen).to(dev)
        a = acp[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        cond = encode_tokens(tokenizer, text_encoder, prompts, dev)
        pred = unet(x_t, t, encoder_hidden_states=cond).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per * loss_w[t]).mean()
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_te, text_encoder, decay)
        losses.append(float(per.detach().mean()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if cfg.max_minutes is not None and time.time() - t_start > cfg.max_minutes * 60:
            stopped_early = True
            break
    bar.close()
    t_train = time.time() - t_start - t_data

    meta = {
        "train_config": asdict(cfg),
        "steps_done": len(losses),
        "stopped_early": stopped_early,
        "device": str(dev),
        "torch": torch.__version__,
        "final_loss": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "data_seconds": round(t_data, 1),
        "train_seconds": round(t_train, 1),
        "guidance_scale": cfg.guidance_scale,
        "shapes": list(SHAPES),
        "colours": COLOURS,
        "world": 2,
    }
    out = save_toy_folder(out, tokenizer, ema_te.cpu(), ema_unet.cpu(), scheduler, meta)
    (out / "loss_log.json").write_text(json.dumps([round(v, 5) for v in losses[::10]]) + "\n")

    # Sample grid: one row per prompt, 4 samples each.
    from .loading import load_prior
    from .sample import image_grid, sample_images, save_png

    prior = load_prior(str(out), device=dev, dtype=torch.float32)
    images = sample_images(
        prior, sample_grid_prompts(), n=4, steps=cfg.sample_steps, guidance=cfg.guidance_scale, seed=cfg.seed
    )
    save_png(image_grid(images, nrow=4), out / "samples.png", upscale=2)
    return out
