"""The stage contract: what a stage declares and what it is handed when it runs.

A stage is a pure function of (params, seed, upstream artifacts, prior): it reads its inputs
from `ctx.inputs`, writes files into `ctx.out` (a temp folder the store commits atomically),
and records metrics/backends in the context. It never computes keys, touches the store or
knows about Prefect; that is the runner's job. Example: stages/encode_prompt.py.

This module sits at the bottom with the store: what a stage is handed (the prior, the backend
objects, the camera distribution) is built by the runner and only named here for type checkers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from t3d.optim import decay_learning_rates
from t3d.store import apply_umask

if TYPE_CHECKING:
    from t3d.priors.base import DiffusionPrior
    from t3d.render.cameras import CameraParams
    from t3d.runner import Backends

_log = logging.getLogger("t3d.stage")


class ExecutorParams(BaseModel):
    """Where a stage (or a whole flow) runs: a Prefect work pool, e.g. {pool: gpu}."""

    model_config = ConfigDict(extra="forbid")

    pool: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RecoveryParams(BaseModel):
    """flow.yaml `recovery:`: how an optimisation that diverges heals itself. Not in artifact keys:
    a run that never diverges is the same whatever these say."""

    model_config = ConfigDict(extra="forbid")

    retries: int = Field(2, ge=0, description="roll-backs per stage before it fails")
    lr_factor: float = Field(0.5, gt=0, le=1, description="learning rates are multiplied by this at each retry")
    collapse_opacity: float = Field(0.005, ge=0, description="mean render opacity below this ...")
    collapse_steps: int = Field(10, ge=1, description="... for this many steps in a row means the field collapsed")


class StageParams(BaseModel):
    """Base for every stage's params block in flow.yaml. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    executor: ExecutorParams | None = None

    def key_params(self) -> dict:
        """The params that define the result (`enabled` and where it runs do not)."""
        return self.model_dump(mode="json", exclude={"enabled", "executor"})


@dataclass(frozen=True)
class Stage:
    name: str  # the flow.yaml key under `stages:` and the `--from` name
    version: str  # bump when the output for the same params would change
    params: type[StageParams]
    inputs: tuple[str, ...]  # upstream stages whose artifacts this one reads
    run: Callable[[StageContext], None]
    optional_inputs: tuple[str, ...] = ()  # read when enabled in the flow (e.g. refine's field over coarse's)
    uses_prompt: bool = False  # True: the prompt text itself is part of the key (encode_prompt)
    uses_seed: bool = True  # False: deterministic whatever the seed, so N seeds of a prompt share it (encode_prompt)
    uses_prior: bool = (
        True  # False: never runs the prior, so compute: options that change results stay out of its key (export)
    )
    description: str = ""


ProgressHook = Callable[[str, int, int, dict], None]  # (stage, step, total, postfix)


@dataclass
class StageContext:
    stage: str
    key: str
    params: Any  # the stage's StageParams subclass instance
    seed: int
    prompt: str
    negative_prompt: str
    device: torch.device
    inputs: dict[str, Path]  # upstream stage name -> local folder of its verified artifact
    out: Path  # write outputs here; committed atomically when run() returns
    checkpoint_dir: Path  # survives failures of this key; mid-stage resume reads it
    backends: Backends  # flow.yaml `backends:` on this device: ctx.backends.hashgrid, ctx.backends.raster
    camera: CameraParams  # the flow's camera distribution
    prior_loader: Callable[[], DiffusionPrior] | None = None  # the runner's: once per process, device and compute:
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("t3d.stage"))
    metrics: dict = field(default_factory=dict)
    backend: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    progress_hooks: list[ProgressHook] = field(default_factory=list)
    show_progress: bool = True
    checkpoint_sync: Callable[[], None] | None = None  # called after each checkpoint write (the store makes it durable)
    recovery: RecoveryParams = field(default_factory=RecoveryParams)

    # ---- shared resources -----------------------------------------------------------------
    def load_prior(self) -> DiffusionPrior:
        """The flow's prior, from the loader the runner wired in; what compute: applied lands in
        the manifest's backend."""
        if self.prior_loader is None:
            raise RuntimeError(f"{self.stage}: this stage context has no prior_loader (see t3d.runner.prior_loader)")
        prior = self.prior_loader()
        self.backend["compute"] = prior.compute
        return prior

    def stream_seed(self, stream: str) -> int:
        """The seed of one named random stream of this stage (see `stream_seed`)."""
        return stream_seed(self.seed, self.stage, stream)

    def generator(self, stream: str, device: torch.device | str | None = None) -> torch.Generator:
        """A torch.Generator for one named random stream of this stage, seeded from the flow's seed."""
        return torch.Generator(device=device or "cpu").manual_seed(self.stream_seed(stream))

    # ---- progress -------------------------------------------------------------------------
    @contextlib.contextmanager
    def progress(self, total: int, description: str | None = None, initial: int = 0) -> Iterator[Callable[..., None]]:
        """Yields update(n=1, **postfix): a tqdm bar on a terminal, plus any registered hooks."""
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total,
            initial=initial,
            desc=description or self.stage,
            disable=None if self.show_progress else True,
            leave=False,
            dynamic_ncols=True,
        )
        state = {"step": initial}

        def update(n: int = 1, **postfix: Any) -> None:
            state["step"] += n
            bar.update(n)
            if postfix:
                bar.set_postfix(
                    {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}, refresh=False
                )
            for hook in self.progress_hooks:
                hook(self.stage, state["step"], total, postfix)

        started = time.perf_counter()
        try:
            yield update
        finally:
            bar.close()
            self.timings.setdefault("loop_s", 0.0)
            self.timings["loop_s"] += time.perf_counter() - started

    # ---- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, step: int, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        """Atomically replace the checkpoint: tensors as safetensors, the rest as JSON; then let
        checkpoint_sync copy it into the artifact store (a failed upload is logged, not fatal)."""
        save_checkpoint(self.checkpoint_dir, step, tensors, meta)
        if self.checkpoint_sync is not None:
            try:
                self.checkpoint_sync()
            except Exception as exc:  # the local checkpoint still exists; the next one retries
                self.log.warning(
                    "%s: could not copy the step-%d checkpoint into the store: %s: %s",
                    self.stage,
                    step,
                    type(exc).__name__,
                    exc,
                )

    def load_checkpoint(self) -> tuple[int, dict[str, torch.Tensor], dict] | None:
        return load_checkpoint(self.checkpoint_dir, self.log)


def stream_seed(seed: int, stage: str, stream: str) -> int:
    """Every random stream's seed comes from the flow's seed through here: a hash of (seed, stage,
    stream), so streams are independent of each other and of other stages, and a trainer built
    outside a stage with the flow's seed draws what the stage would. 31 bits: every RNG takes it
    (tinycudann's seed is 32-bit)."""
    digest = hashlib.sha256(f"{int(seed)}/{stage}/{stream}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


# ---- the one training loop ----------------------------------------------------------------
class Trainer(Protocol):
    """What run_resumable steps: coarse, refine, geometry refinement and texture are trainers.

    `lr_decay` lists (optimizer, end_factor) pairs: each group's lr decays exponentially from its
    base_lr to end_factor x base_lr by the last step (empty: constant learning rates). An optional
    `rand` (random.Random) is reseeded with `gen` when a divergence is healed.
    """

    step_idx: int
    history: list[dict]
    gen: torch.Generator
    lr_decay: Sequence[tuple[torch.optim.Optimizer, float]]

    def step(self) -> dict:
        """One optimisation step; returns its record (with "step" and "loss") and appends it to history."""
        ...

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything a resume needs: tensors (safetensors) and JSON-able meta."""
        ...

    def load_state(self, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...


def divergence(history: list[dict], p: RecoveryParams) -> str | None:
    """Why the last steps cannot go on (non-finite loss, a field gone empty), or None."""
    last = history[-1] if history else {}
    if "loss" in last and not math.isfinite(last["loss"]):
        return f"loss is {last['loss']}"
    recent = history[-p.collapse_steps :]
    if len(recent) == p.collapse_steps and all(r.get("opacity", 1.0) < p.collapse_opacity for r in recent):
        return f"the field collapsed (mean opacity < {p.collapse_opacity} for {p.collapse_steps} steps)"
    return None


def _loss_postfix(rec: dict) -> dict:
    return {"loss": rec["loss"]}


def run_resumable(
    ctx: StageContext,
    trainer: Trainer,
    steps: int,
    every: int,
    label: str | None = None,
    postfix: Callable[[dict], dict] = _loss_postfix,
    fresh_start: Callable[[], None] | None = None,
) -> None:
    """Step `trainer` to `steps`: resume from the stage's checkpoint if there is one, decay the
    learning rates before each step, show progress, checkpoint every `every` steps, and heal
    divergence: roll back to the last good checkpoint (or the start), draw a new noise stream,
    scale the learning rates by recovery.lr_factor, retry up to recovery.retries times. Each
    retry lands in the manifest's metrics as `recoveries`.

    `fresh_start` runs once when there was nothing to resume (refine's LoRA warm-up); `postfix`
    turns a step's record into the progress bar's postfix.
    """
    resumed = ctx.load_checkpoint()
    if resumed is not None:
        trainer.load_state(*resumed)
        ctx.metrics["resumed_from"] = int(resumed[0])
        ctx.log.info("%s: resumed at step %d of %d", ctx.stage, resumed[0], steps)
    elif fresh_start is not None:
        fresh_start()
    p = ctx.recovery
    start = _snapshot(trainer)
    recoveries: list[dict] = []
    with ctx.progress(steps, label, initial=trainer.step_idx) as update:
        while trainer.step_idx < steps:
            for optimizer, end_factor in trainer.lr_decay:
                decay_learning_rates(optimizer, end_factor, trainer.step_idx, steps)
            rec = trainer.step()
            problem = divergence(trainer.history, p)
            if problem is None:
                update(1, **postfix(rec))
                if trainer.step_idx % every == 0 and trainer.step_idx < steps:
                    ctx.save_checkpoint(trainer.step_idx, *trainer.state())
                continue
            if len(recoveries) >= p.retries:
                ctx.metrics["recoveries"] = recoveries
                raise FloatingPointError(
                    f"{ctx.stage}: {problem} at step {rec['step']}, also after {len(recoveries)} retries; "
                    "lower the learning rates or guidance_scale"
                )
            before = trainer.step_idx
            good = ctx.load_checkpoint() or start
            trainer.load_state(*good)
            attempt = len(recoveries) + 1
            trainer.gen.manual_seed(ctx.stream_seed(f"retry-{attempt}"))  # a new noise stream
            if hasattr(trainer, "rand"):
                trainer.rand.seed(ctx.stream_seed(f"retry-{attempt}-python"))
            _scale_learning_rates(trainer, p.lr_factor)
            recoveries.append(
                {
                    "step": int(rec["step"]),
                    "reason": problem,
                    "rolled_back_to": int(good[0]),
                    "lr_scale": round(p.lr_factor**attempt, 6),
                }
            )
            ctx.log.warning(
                "%s: %s at step %d; rolled back to step %d, retry %d of %d with learning rates x%g",
                ctx.stage,
                problem,
                rec["step"],
                good[0],
                attempt,
                p.retries,
                p.lr_factor**attempt,
            )
            update(trainer.step_idx - before)
    if recoveries:
        ctx.metrics["recoveries"] = recoveries


def _snapshot(trainer: Any) -> tuple[int, dict[str, torch.Tensor], dict]:
    tensors, meta = trainer.state()
    return (
        trainer.step_idx,
        {k: v.detach().clone() for k, v in tensors.items()},
        json.loads(json.dumps(meta, default=str)),
    )


def _scale_learning_rates(trainer: Any, factor: float) -> None:
    for opt in (v for v in vars(trainer).values() if isinstance(v, torch.optim.Optimizer)):
        for group in opt.param_groups:
            group["lr"] *= factor
            if "base_lr" in group:
                group["base_lr"] *= factor


# ---- checkpoint files ---------------------------------------------------------------------
def save_checkpoint(folder: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp_t, tmp_m = folder / "state.safetensors.tmp", folder / "state.json.tmp"
    payload = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    payload["__step__"] = torch.tensor(int(step))
    save_file(payload, str(tmp_t))
    tmp_m.write_text(json.dumps({"step": int(step), "meta": meta or {}}, default=str))
    apply_umask(tmp_t)  # safetensors creates its files 0600; a shared store needs the umask's modes
    # Tensors first, then the JSON that names the step: a kill in between leaves the old JSON,
    # which load_checkpoint rejects by comparing the step stored in both.
    tmp_t.replace(folder / "state.safetensors")
    tmp_m.replace(folder / "state.json")


def load_checkpoint(
    folder: Path, log: logging.Logger | None = None
) -> tuple[int, dict[str, torch.Tensor], dict] | None:
    """(step, tensors, meta), or None when there is no usable checkpoint.

    A truncated or corrupt checkpoint (unreadable JSON or safetensors) is logged in one line,
    deleted and treated as absent, so the stage restarts instead of failing on it forever.
    """
    t, m = folder / "state.safetensors", folder / "state.json"
    if not (t.exists() and m.exists()):
        return None
    current = m
    try:
        info = json.loads(m.read_text())
        step = int(info["step"])
        meta = info.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError("meta is not an object")
        current = t
        tensors = load_file(str(t))
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        SafetensorError,
    ) as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        (log or _log).warning(
            "checkpoint %s is unreadable (%s: %s); deleting it and starting the stage over",
            current,
            type(exc).__name__,
            str(exc).splitlines()[0][:200] if str(exc) else "",
        )
        for path in (t, m):
            path.unlink(missing_ok=True)
        return None
    if "__step__" in tensors and int(tensors.pop("__step__").item()) != step:
        return None
    return step, tensors, meta
