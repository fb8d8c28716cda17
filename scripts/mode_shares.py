"""Mode coverage of the under-specified prompts at a given CFG: the prior gate's second check alone.

python scripts/mode_shares.py 1.0     # 64 samples per prompt, 25 DDIM steps, CFG 1 (no guidance)
"""

import json
import sys


def main() -> None:
    import torch

    from t3d.priors import load_prior
    from t3d.priors.quality import classify_shapes, dominant_colour
    from t3d.priors.sample import sample_images
    from t3d.toy.world import COLOURS, SHAPES, parse_toy_prompt, underspecified_prompts

    torch.set_num_threads(1)
    guidance = float(sys.argv[1]) if len(sys.argv) > 1 else 7.5
    under = underspecified_prompts()
    images = sample_images(load_prior("embedded"), under, n=64, steps=25, guidance=guidance, seed=1)
    shares = {}
    for i, prompt in enumerate(under):
        toy = parse_toy_prompt(prompt)
        x = images[i * 64 : (i + 1) * 64]
        found, modes = (dominant_colour(x), COLOURS) if toy.colour is None else (classify_shapes(x, None)[0], SHAPES)
        shares[prompt] = {m: round(sum(f == m for f in found) / 64, 3) for m in modes}
    print(
        json.dumps({"guidance": guidance, "min_share": min(min(v.values()) for v in shares.values()), "shares": shares})
    )


if __name__ == "__main__":
    main()
