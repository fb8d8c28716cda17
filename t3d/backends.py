"""One switch per CUDA library with a pure-torch twin: tinycudann (hash grid), nvdiffrast (rasterizer).

The choice is made by running a real smoke op on the device, never by whether an import or nvcc
exists: a tinycudann wheel can import and still fail on this GPU's architecture. The result is
cached per (library, request, device) and recorded in each stage's manifest.

Each library has one backend object that carries its choice and its operations, built by its own
building block: `t3d.fields.hashgrid.choose_hashgrid` (constructs encodings) and
`t3d.render.raster.choose_raster` (rasterize, interpolate, texture, antialias). A run holds both in
a `t3d.runner.Backends` (above the building blocks, as this module sits below them), built from
flow.yaml's `backends:` block and handed to each stage as `ctx.backends`. The block is outside the
artifact keys: both twins compute the same function (tests/test_cuda_parity.py), and an artifact
written under one loads under the other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

HashGridRequest = Literal["auto", "tinycudann", "torch"]
RasterRequest = Literal["auto", "nvdiffrast", "torch"]


class BackendsParams(BaseModel):
    """flow.yaml `backends:`: which library runs each GPU building block. Not in artifact keys.

    auto: the library when its smoke op passes on the run's device, else the torch twin (logged);
    the library's name: that library or the run fails; torch: never try the library."""

    model_config = ConfigDict(extra="forbid")

    hashgrid: HashGridRequest = "auto"
    raster: RasterRequest = "auto"


@dataclass(frozen=True)
class BackendChoice:
    library: str  # e.g. "tinycudann", "nvdiffrast"
    backend: str  # the library's name when it runs, else "torch"
    reason: str

    def as_dict(self) -> dict:
        return {"library": self.library, "backend": self.backend, "reason": self.reason}


def normalise_device(device: torch.device | str) -> torch.device:
    """`cuda` -> `cuda:<current>`, so one GPU has one cache entry however it is named."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


_cache: dict[tuple[str, str, str], BackendChoice] = {}


def choose_backend(
    library: str,
    request: str,
    device: torch.device | str,
    smoke_op: Callable[[torch.device], None],
) -> BackendChoice:
    """Pick `library` or its torch twin. `smoke_op(device)` must import and run the library for real.

    request=`library` makes a failing smoke op an error (the user asked for it by name); "auto"
    falls back to torch with the reason logged; "torch" never tries the library.
    """
    if request not in ("auto", "torch", library):
        raise ValueError(f"backend request {request!r} for {library}: use auto, {library} or torch")
    device = normalise_device(device)
    key = (library, request, str(device))
    if key in _cache:
        return _cache[key]
    if request == "torch":
        choice = BackendChoice(library, "torch", "requested")
    elif device.type != "cuda":
        if request == library:
            raise RuntimeError(
                f"{library} was requested (flow.yaml backends:) but the device is {device}: it needs CUDA. "
                "Request auto or torch."
            )
        choice = BackendChoice(library, "torch", f"device is {device.type}")
    else:
        try:
            smoke_op(device)
            choice = BackendChoice(library, library, "smoke op passed")
        except Exception as exc:  # any failure (ImportError, EnvironmentError, CUDA error) means: not usable
            if request == library:
                raise RuntimeError(f"{library} was requested but its smoke op failed: {exc!r}") from exc
            choice = BackendChoice(library, "torch", f"smoke op failed: {type(exc).__name__}: {exc}"[:300])
            log.warning("%s unavailable, using the pure-torch twin (%s)", library, choice.reason)
    _cache[key] = choice
    return choice
