"""Best-of-N: one prompt with N seeds, each a normal (cached, resumable) run, ranked by the prior.

Results depend on the seed; instead of users re-running by hand, `seeds: 4` runs four and scores
each exported asset with the prior itself (t3d/mesh/selection.py: how much the prompt helps
the prior denoise renders of the asset). The seeds share encode_prompt, whose key has no seed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from t3d.flows.flow import PromptRun, run_prompt

log = logging.getLogger("t3d")


@dataclass
class BestOfN:
    prompt: str
    ranked: list[tuple[int, PromptRun, dict]] = field(default_factory=list)  # best first, failed last

    @property
    def best(self) -> PromptRun:
        return self.ranked[0][1]

    @property
    def best_seed(self) -> int:
        return self.ranked[0][0]


def run_seeds(cfg, prompt: str, registry, **run_kwargs) -> BestOfN:
    """Run `prompt` once per seed of `cfg.seed_list()` (each resumes from the store), then rank."""
    runs = {}
    seeds = cfg.seed_list()
    for i, seed in enumerate(seeds, 1):
        if len(seeds) > 1:
            log.info("seed %d (%d of %d)", seed, i, len(seeds))
        runs[seed] = run_prompt(cfg.model_copy(update={"seed": seed}), prompt, registry, **run_kwargs)
    return BestOfN(prompt, rank_runs(cfg, prompt, runs))


def rank_runs(cfg, prompt: str, runs: dict[int, PromptRun]) -> list[tuple[int, PromptRun, dict]]:
    """(seed, run, score) best first. A single seed is not scored; failed runs come last."""
    if len(runs) == 1:
        seed, run = next(iter(runs.items()))
        return [(seed, run, {})]
    glbs = {seed: _glb(run) for seed, run in runs.items() if run.state != "failed"}
    glbs = {seed: path for seed, path in glbs.items() if path is not None}
    scores = score_glbs(cfg, prompt, glbs) if glbs else {}
    if not scores:
        log.warning("best-of-N: no exported GLB to score (is the export stage enabled?); keeping seed order")
    from t3d.mesh.selection import rank_seeds

    order = rank_seeds(scores) if scores else []
    order += [s for s in runs if s not in order and runs[s].state != "failed"]
    order += [s for s in runs if s not in order]
    return [(s, runs[s], asdict(scores[s]) if s in scores else {}) for s in order]


def score_glbs(cfg, prompt: str, glbs: dict[int, Path]) -> dict:
    """Each seed's exported GLB scored by the flow's prior on the flow's device (loaded once)."""
    from t3d import runner
    from t3d.mesh.selection import score_result
    from t3d.render.raster import choose_raster

    device = runner.resolve_device(cfg.device)
    prior = runner.prior_loader(cfg.prior, device, cfg.compute)()
    raster = choose_raster(cfg.backends.raster, device)
    with runner.cpu_threads(device):
        return {
            seed: score_result(
                prior, path, prompt, cfg.camera, raster=raster, device=device, negative_prompt=cfg.negative_prompt
            )
            for seed, path in glbs.items()
        }


def _glb(run: PromptRun) -> Path | None:
    for result in run.results:
        if result.stage == "export" and result.path:
            found = sorted(Path(result.path).glob("*.glb"))
            return found[0] if found else None
    return None
