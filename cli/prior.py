"""`t3d prior ...`: train the embedded toy prior, sample a PNG grid from any prior. Thin: the logic
lives in t3d.priors.train and t3d.priors.sample."""

from __future__ import annotations

from pathlib import Path

import typer

prior_app = typer.Typer(help="The diffusion prior: train the embedded toy prior, sample images.", no_args_is_help=True)


@prior_app.command("train")
def train(
    out: Path = typer.Option(Path("priors/embedded"), "--out", help="Folder to write the diffusers-layout weights to."),
    seed: int = typer.Option(0, "--seed", help="Seed for the data set, the initialization and training."),
    steps: int | None = typer.Option(None, "--steps", help="Training steps (default: the documented setting)."),
    minutes: float | None = typer.Option(
        None, "--minutes", help="Safety time limit; a run stopped by it is not the reproducible one."
    ),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda."),
) -> None:
    """Regenerate the toy data set and retrain the embedded prior from a seed."""
    from t3d.priors.train import TrainConfig, train_toy_prior

    cfg = TrainConfig(seed=seed, max_minutes=minutes)
    if steps is not None:
        cfg.steps = steps
    folder = train_toy_prior(cfg, out=out, device=device)
    typer.echo(f"wrote {folder} (sample grid: {folder / 'samples.png'})")


@prior_app.command("sample")
def sample(
    prompt: str = typer.Argument(..., help='e.g. "a blue cone, side view"'),
    n: int = typer.Option(8, "--n", help="Number of samples."),
    steps: int = typer.Option(50, "--steps", help="DDIM steps."),
    guidance: float | None = typer.Option(
        None, "--guidance", help="Classifier-free guidance scale (default: the prior's own, 7.5 for the toy prior)."
    ),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("grid.png"), "--out", help="PNG grid to write."),
    prior: str = typer.Option("embedded", "--prior", help="embedded, a local diffusers folder or a hub id."),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Sample a PNG grid of images for a prompt."""
    from t3d.priors.sample import sample_grid

    path = sample_grid(prompt, n=n, steps=steps, guidance=guidance, seed=seed, out=out, prior=prior, device=device)
    typer.echo(f"wrote {path}")
