"""One switch for every CUDA library with a pure-torch twin (tinycudann, nvdiffrast).

The choice is made by running a real smoke op on the device, never by whether an import or nvcc
exists: a tinycudann wheel can import and still fail on this GPU's architecture. The result is
cached per (library, device) and recorded in each stage's manifest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

log = logging.getLogger(__name__)

BackendRequest = Literal["auto", "cuda-library", "torch"]


@dataclass(frozen=True)
class BackendChoice:
    library: str  # e.g. "tinycudann", "nvdiffrast"
    backend: str  # the library's name when it runs, else "torch"
    reason: str

    def as_dict(self) -> dict:
        return {"library": self.library, "backend": self.backend, "reason": self.reason}


_cache: dict[tuple[str, str, str], BackendChoice] = {}


def choose_backend(
    library: str,
    request: BackendRequest,
    device: torch.device | str,
    smoke_op: Callable[[torch.device], None],
) -> BackendChoice:
    """Pick `library` or its torch twin. `smoke_op(device)` must import and run the library for real.

    request="cuda-library" makes a failing smoke op an error (the user asked for it explicitly);
    "auto" falls back to torch with the reason logged; "torch" never tries the library.
    """
    device = torch.device(device)
    key = (library, request, str(device))
    if key in _cache:
        return _cache[key]
    if request == "torch":
        choice = BackendChoice(library, "torch", "requested")
    elif device.type != "cuda":
        if request == "cuda-library":
            raise RuntimeError(
                f"{library} was requested but the device is {device}: it needs CUDA. Use backend 'auto' or 'torch'."
            )
        choice = BackendChoice(library, "torch", f"device is {device.type}")
    else:
        try:
            smoke_op(device)
            choice = BackendChoice(library, library, "smoke op passed")
        except Exception as exc:  # any failure (ImportError, EnvironmentError, CUDA error) means: not usable
            if request == "cuda-library":
                raise RuntimeError(f"{library} was requested but its smoke op failed: {exc!r}") from exc
            choice = BackendChoice(library, "torch", f"smoke op failed: {type(exc).__name__}: {exc}"[:300])
            log.warning("%s unavailable, using the pure-torch twin (%s)", library, choice.reason)
    _cache[key] = choice
    return choice
