"""Quality of a prior on the toy world: colour and shape accuracy of its samples.

For every toy prompt (base prompt x view suffix, 80 in all) it draws --n samples (DDIM --steps,
CFG --guidance) and checks each sample's dominant foreground colour and its silhouette against
every shape's ground-truth renders over the views the suffix allows (see t3d.priors.quality).

    python bench/prior_quality.py                       # the full benchmark (8 x 80 samples)
    python bench/prior_quality.py --n 2 --steps 20 --prompt "a red cube, front view"

Toy world v2 (unless --no-v2 or --prompt): every marked prompt from the front and the back
(--n-marked samples each; the spot must show from the front and not from the back), and every
under-specified prompt (--n-modes samples each; every colour or shape in >= 10 % of them).

Goals for the embedded prior: color_acc >= 0.95, shape_acc >= 0.90, mark_acc >= 0.90,
modes_covered. The LAST output line is one JSON object with keys color_acc, shape_acc,
per_prompt, v2 {mark_acc, modes_covered, min_mode_share, ...}, gate {...} (plus the settings used).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", default="embedded", help="embedded, a local diffusers folder or a hub id")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", action="append", default=None, help="evaluate only this prompt (repeatable)")
    ap.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first N toy prompts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on busy cores)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--n-marked", type=int, default=4, help="samples per marked prompt and view (front, back)")
    ap.add_argument("--n-modes", type=int, default=64, help="samples per under-specified prompt")
    ap.add_argument("--no-v2", action="store_true", help="skip toy world v2's checks (marks, modes)")
    ap.add_argument("--grid", default=None, help="also write all samples as a PNG grid (one row per prompt)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from t3d.priors import load_prior
    from t3d.priors.quality import evaluate_prior
    from t3d.toy.world import toy_prompts_with_views

    prompts = args.prompt or toy_prompts_with_views()
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    t0 = time.time()
    prior = load_prior(args.prior, device=args.device)
    res = evaluate_prior(
        prior,
        prompts,
        n=args.n,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=sys.stderr.isatty(),
        return_images=bool(args.grid),
    )
    if not (args.no_v2 or args.prompt or args.max_prompts):
        from t3d.priors.quality import evaluate_world_v2

        res["v2"] = evaluate_world_v2(
            prior,
            n_marked=args.n_marked,
            n_modes=args.n_modes,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=sys.stderr.isatty(),
        )
    res["gate"] = {"color_acc": res["color_acc"] >= 0.95, "shape_acc": res["shape_acc"] >= 0.90}
    if "v2" in res:
        res["gate"].update({"mark_acc": res["v2"]["mark_acc"] >= 0.90, "modes_covered": res["v2"]["modes_covered"]})
    res["gate"]["passed"] = all(res["gate"].values())
    res["seconds"] = round(time.time() - t0, 1)
    if args.grid:
        from t3d.priors.sample import image_grid, save_png

        save_png(image_grid(res.pop("images"), nrow=args.n), args.grid, upscale=2)
    for prompt, r in res["per_prompt"].items():
        print(
            f"{prompt:40s} color {r['color_acc']:.2f}  shape {r['shape_acc']:.2f}  shapes={r['shapes']}",
            file=sys.stderr,
        )
    if "v2" in res:
        for prompt, r in res["v2"]["per_marked"].items():
            print(f"{prompt:55s} mark {r['mark_acc']:.2f}", file=sys.stderr)
        for prompt, r in res["v2"]["per_underspecified"].items():
            print(f"{prompt:20s} modes {r['mode_share']}  named {r['named_attribute_acc']:.2f}", file=sys.stderr)
    v2 = (
        f"  mark_acc={res['v2']['mark_acc']:.3f} (goal 0.90)  min_mode_share={res['v2']['min_mode_share']:.3f} "
        "(goal 0.10)"
        if "v2" in res
        else ""
    )
    print(
        f"color_acc={res['color_acc']:.3f} (goal 0.95)  shape_acc={res['shape_acc']:.3f} (goal 0.90){v2}  "
        f"gate {'passed' if res['gate']['passed'] else 'FAILED'}  in {res['seconds']} s"
    )
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
