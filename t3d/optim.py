"""Optimizer helpers every trainer shares: learning-rate decay derived from the step (resume needs
no scheduler state) and optimizer state flattened for safetensors checkpoints and back."""

from __future__ import annotations

import torch


def decay_learning_rates(optimizer: torch.optim.Optimizer, end_factor: float, step: int, steps: int) -> None:
    """Exponential decay from each group's base_lr to end_factor x base_lr at the last step
    (derived from the step, so resume needs no scheduler state)."""
    decay = end_factor ** (step / max(steps - 1, 1))
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * decay


def flatten_optimizer(optimizer: torch.optim.Optimizer, prefix: str = "opt") -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors (for safetensors) plus JSON-able metadata."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "opt"
) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
