"""Best-of-N on the toy world (issue #17): does the seed the prior itself picks beat the median seed?

Each prompt runs the real flow (examples/sds_red_cube.yaml, shortened by REDUCED's --set overrides
so one run takes well under a minute on one core) with seeds 0..N-1 into a persistent store, so a
re-run reuses every finished stage. Each seed's exported GLB is then scored with
t3d.mesh.selection.score_result (the prior's denoising error with the prompt against without
it, on fixed views, timesteps and noise), the best score is the pick, and the pick's IoU and
colour error (the export stage's toy metrics, against the true primitive) are compared with the
median over that prompt's seeds. "Beats" is strictly better (IoU higher, colour error lower); equal
is a tie. For scale, the summary also gives the rate a random seed would reach and the oracle's
(the best seed by that metric).

    python bench/best_of_n.py --jobs 2                          # 8 prompts x 4 seeds
    python bench/best_of_n.py --prompts "a red cube" --seeds 2 --set stages.coarse.steps=100

Progress goes to stderr; the last stdout line is one JSON object {"prompts", "summary", "config"}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_FLOW = ROOT / "examples" / "sds_red_cube.yaml"
DEFAULT_STORE = ROOT / "bench" / ".store-best-of-n"

# Every colour twice, every shape at least once (t3d/toy/world.py's COLOURS x SHAPES).
DEFAULT_PROMPTS = (
    "a red cube",
    "a blue sphere",
    "a green cone",
    "a yellow cylinder",
    "a red torus",
    "a green cube",
    "a yellow sphere",
    "a blue cone",
)

# The main job, shortened: half the coarse steps, marching cubes without the SDF refinement
# (~35-50 s of the main job's ~2 min), 4-frame previews and a GLB-only export.
REDUCED = (
    "stages.coarse.steps=200",
    "stages.coarse.preview_frames=4",
    "stages.extract_mesh.geometry.steps=0",
    "stages.extract_mesh.preview_frames=4",
    "stages.texture.preview_frames=4",
    "stages.export.formats=[glb]",
    "stages.export.turntable_frames=4",
    "stages.export.turntable_size=64",
)


def median_comparison(value: float, values: list[float], higher_is_better: bool) -> str:
    """'beats', 'ties' or 'loses' against the median of values."""
    med = statistics.median(values)
    if value == med:
        return "ties"
    return "beats" if (value > med) == higher_is_better else "loses"


def kendall_tau(xs: list[float], ys: list[float]) -> float | None:
    """Kendall's tau-a of two paired lists (None below 2 pairs): +1 when they order the seeds alike."""
    n = len(xs)
    if n < 2:
        return None
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    sign = lambda v: (v > 0) - (v < 0)  # noqa: E731
    return sum(sign(xs[i] - xs[j]) * sign(ys[i] - ys[j]) for i, j in pairs) / len(pairs)


def analyse_prompt(prompt: str, seeds: list[dict]) -> dict:
    """One prompt's seeds (score, iou, color_err each) -> the pick, the medians and how the pick compares."""
    from t3d.mesh.selection import SeedScore, rank_seeds

    ok = [s for s in seeds if s.get("error") is None]
    row: dict = {"prompt": prompt, "seeds": seeds}
    if len(ok) < 2:
        return {**row, "error": f"{len(ok)} seed(s) scored; need 2"}
    fields = SeedScore.__dataclass_fields__
    pick = rank_seeds({s["seed"]: SeedScore(**{k: s[k] for k in fields}) for s in ok})[0]
    chosen = next(s for s in ok if s["seed"] == pick)
    ious, errs = [s["iou"] for s in ok], [s["color_err"] for s in ok]
    vs_iou = median_comparison(chosen["iou"], ious, True)
    vs_color = median_comparison(chosen["color_err"], errs, False)
    return {
        **row,
        "pick": pick,
        "pick_iou": chosen["iou"],
        "pick_color_err": chosen["color_err"],
        "median_iou": round(statistics.median(ious), 4),
        "median_color_err": round(statistics.median(errs), 4),
        "pick_vs_median": {"iou": vs_iou, "color_err": vs_color},
        "pick_beats_median": {"iou": vs_iou == "beats", "color_err": vs_color == "beats"},
        # what a seed drawn at random would reach, and the best seed by each metric
        "random_beats": {
            "iou": sum(median_comparison(v, ious, True) == "beats" for v in ious) / len(ok),
            "color_err": sum(median_comparison(v, errs, False) == "beats" for v in errs) / len(ok),
            "both": sum(
                median_comparison(s["iou"], ious, True) == "beats"
                and median_comparison(s["color_err"], errs, False) == "beats"
                for s in ok
            )
            / len(ok),
        },
        "oracle_beats": {
            "iou": median_comparison(max(ious), ious, True) == "beats",
            "color_err": median_comparison(min(errs), errs, False) == "beats",
            "both": any(
                median_comparison(s["iou"], ious, True) == "beats"
                and median_comparison(s["color_err"], errs, False) == "beats"
                for s in ok
            ),
        },
        "kendall_tau": {
            "score_vs_iou": kendall_tau([s["score"] for s in ok], ious),
            "score_vs_neg_color_err": kendall_tau([s["score"] for s in ok], [-e for e in errs]),
        },
    }


def summarise(rows: list[dict], n_seeds: int, wall_s: float) -> dict:
    done = [r for r in rows if "pick" in r]
    n = len(done)
    rate = lambda f: round(sum(map(f, done)) / n, 4) if n else None  # noqa: E731
    mean = lambda vs: round(statistics.fmean(vs), 4) if vs else None  # noqa: E731
    score_s = [s["score_s"] for r in rows for s in r["seeds"] if "score_s" in s]
    taus = {k: [r["kendall_tau"][k] for r in done] for k in ("score_vs_iou", "score_vs_neg_color_err")}
    return {
        "n_prompts": n,
        "n_seeds": n_seeds,
        "n_failed_prompts": len(rows) - n,
        "n_failed_runs": sum(s.get("error") is not None for r in rows for s in r["seeds"]),
        "rate_iou": rate(lambda r: r["pick_beats_median"]["iou"]),
        "rate_color": rate(lambda r: r["pick_beats_median"]["color_err"]),
        "rate_both": rate(lambda r: r["pick_beats_median"]["iou"] and r["pick_beats_median"]["color_err"]),
        "ties_iou": sum(r["pick_vs_median"]["iou"] == "ties" for r in done),
        "ties_color": sum(r["pick_vs_median"]["color_err"] == "ties" for r in done),
        "random_rate_iou": rate(lambda r: r["random_beats"]["iou"]),
        "random_rate_color": rate(lambda r: r["random_beats"]["color_err"]),
        "random_rate_both": rate(lambda r: r["random_beats"]["both"]),
        "oracle_rate_iou": rate(lambda r: r["oracle_beats"]["iou"]),
        "oracle_rate_color": rate(lambda r: r["oracle_beats"]["color_err"]),
        "oracle_rate_both": rate(lambda r: r["oracle_beats"]["both"]),
        "mean_kendall_tau_score_iou": mean(taus["score_vs_iou"]),
        "mean_kendall_tau_score_neg_color_err": mean(taus["score_vs_neg_color_err"]),
        "mean_pick_iou": mean([r["pick_iou"] for r in done]),
        "mean_median_iou": mean([r["median_iou"] for r in done]),
        "mean_pick_color_err": mean([r["pick_color_err"] for r in done]),
        "mean_median_color_err": mean([r["median_color_err"] for r in done]),
        "score_s_per_result": mean(score_s),
        "wall_s": round(wall_s, 1),
    }


# ---- running and scoring (in worker processes) ---------------------------------------------------


def run_and_score(prompt: str, seeds: list[int], sets: list[str], store: str, score_kw: dict) -> list[dict]:
    """In a worker: run the flow for each seed (the store skips finished stages), then score each export GLB."""
    import torch

    from t3d.flows.config import load_config
    from t3d.flows.flow import run_prompt
    from t3d.mesh.selection import score_result
    from t3d.priors import load_prior
    from t3d.render.raster import choose_raster
    from t3d.runner import resolve_device
    from t3d.stages import registry_from_env

    torch.set_num_threads(int(os.environ.get("T3D_TORCH_THREADS", "1")))
    reg = registry_from_env()
    out, done = [], []
    for seed in seeds:
        cfg = load_config(str(BASE_FLOW), [*sets, f"store={store}", f"seed={seed}"], reg, prompt=prompt)
        started = time.perf_counter()
        result = run_prompt(cfg, prompt, reg, use_prefect=False, show_progress=False)
        row = {"seed": seed, "flow_s": round(time.perf_counter() - started, 1)}
        row["stages"] = {r.stage: {"state": r.state, "seconds": round(r.seconds, 1)} for r in result.results}
        export = next((r for r in result.results if r.stage == "export" and r.path), None)
        if result.error or export is None:
            row["error"] = result.error or "no export stage result"
        else:
            row.update(iou=export.metrics.get("iou"), color_err=export.metrics.get("color_err"))
            done.append((row, cfg, Path(export.path) / f"{export.metrics['name']}.glb"))
        print(f"{prompt!r} seed {seed}: {row.get('error') or 'done'} in {row['flow_s']} s", file=sys.stderr, flush=True)
        out.append(row)
    if done:
        cfg = done[0][1]
        device = resolve_device(cfg.device)
        prior = load_prior(cfg.prior, device=device, compute=cfg.compute)
        raster = choose_raster(cfg.backends.raster, device)
        for row, cfg, glb in done:
            started = time.perf_counter()
            score = score_result(
                prior,
                glb,
                prompt,
                cfg.camera,
                raster=raster,
                device=device,
                negative_prompt=cfg.negative_prompt,
                **score_kw,
            )
            row.update({k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(score).items()})
            row["score_s"] = round(time.perf_counter() - started, 2)
    return out


def run_all(prompts: list[str], seeds: list[int], sets: list[str], store: str, score_kw: dict, jobs: int) -> dict:
    """Each prompt (all its seeds) in one of `jobs` spawned processes; a crashed prompt is reported, not fatal."""
    import multiprocessing

    results: dict[str, list[dict]] = {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_and_score, p, seeds, sets, store, score_kw): p for p in prompts}
        for fut in as_completed(futures):
            prompt = futures[fut]
            try:
                results[prompt] = fut.result()
            except Exception as exc:
                results[prompt] = [{"seed": s, "error": f"{type(exc).__name__}: {exc}"} for s in seeds]
    return results


def main(argv: list[str] | None = None) -> dict:
    from t3d.mesh.selection import DEFAULT_TIMESTEPS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS))
    ap.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 per prompt")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra flow override (after REDUCED)")
    ap.add_argument("--store", default=str(DEFAULT_STORE), help="persistent artifact store (re-runs reuse it)")
    ap.add_argument("--jobs", type=int, default=1, help="prompts run in this many processes")
    ap.add_argument("--views", type=int, default=8, help="score_result's n_views")
    ap.add_argument("--noises", type=int, default=2, help="score_result's n_noise")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.seeds < 2:
        ap.error("--seeds: need at least 2 seeds to pick from")
    os.environ.setdefault("T3D_TORCH_THREADS", "1")  # inherited by the spawned workers
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sets = [*REDUCED, *args.sets]
    seeds = list(range(args.seeds))
    score_kw = {"n_views": args.views, "n_noise": args.noises, "timesteps": DEFAULT_TIMESTEPS, "seed": 0}
    started = time.perf_counter()
    results = run_all(args.prompts, seeds, sets, args.store, score_kw, args.jobs)
    rows = [analyse_prompt(p, results[p]) for p in args.prompts]
    report = {
        "prompts": rows,
        "summary": summarise(rows, len(seeds), time.perf_counter() - started),
        "config": {
            "flow": str(BASE_FLOW.relative_to(ROOT)),
            "overrides": sets,
            "prompts": args.prompts,
            "seeds": seeds,
            "store": args.store,
            "jobs": args.jobs,
            "torch_threads": os.environ["T3D_TORCH_THREADS"],
            "score": {**score_kw, "timesteps": list(DEFAULT_TIMESTEPS)},
            "command": shlex.join(["python", "bench/best_of_n.py", *(argv if argv is not None else sys.argv[1:])]),
        },
    }
    text = json.dumps(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
