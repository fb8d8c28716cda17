"""`t3d doctor`: what this machine has, and what each missing piece costs."""

from __future__ import annotations

import os
import platform
import sys


def _try(fn):
    try:
        return True, fn()
    except Exception as exc:  # a doctor reports, never crashes
        return False, f"{type(exc).__name__}: {exc}"[:200]


def checks() -> list[tuple[str, bool, str]]:
    rows: list[tuple[str, bool, str]] = []
    rows.append(("python", sys.version_info >= (3, 10), f"{platform.python_version()} ({sys.executable})"))
    import torch

    rows.append(("torch", True, f"{torch.__version__}, {torch.get_num_threads()} CPU threads"))
    cuda = torch.cuda.is_available()
    rows.append(("CUDA", cuda, torch.cuda.get_device_name(0) if cuda else "none: stages run on the CPU (fine for the toy prior; SD-sized priors need a GPU)"))

    from t3d.backends import choose_backend

    device = torch.device("cuda" if cuda else "cpu")
    for lib, smoke, cost in (
        ("tinycudann", _tcnn_smoke, "hash grid falls back to the pure-torch twin (same results, several times slower)"),
        ("nvdiffrast", _nvdiffrast_smoke, "rasterizer falls back to the pure-torch twin (slower at high resolution)"),
    ):
        choice = choose_backend(lib, "auto", device, smoke)
        ok = choice.backend == lib
        rows.append((lib, ok, "smoke op passed" if ok else f"{choice.reason}; {cost}"))

    for mod in ("diffusers", "transformers", "peft", "prefect", "trimesh", "xatlas", "mcubes"):
        ok, detail = _try(lambda m=mod: __import__(m).__dict__.get("__version__", "installed"))
        rows.append((mod, ok, str(detail)))

    ok, detail = _try(_embedded_prior)
    rows.append(("embedded prior", ok, detail if ok else f"{detail}; `t3d prior train` rebuilds it"))

    api = os.environ.get("PREFECT_API_URL")
    if not api:
        from prefect.settings import PREFECT_API_URL

        api = PREFECT_API_URL.value()
    if api:
        ok, detail = _try(lambda: _ping(api))
        rows.append(("Prefect API", ok, f"{api}: {detail}"))
    else:
        rows.append(("Prefect API", True, "none configured: each run starts a temporary local server (7-18 s); `t3d server` gives a persistent one with the UI"))
    return rows


def _ping(api: str) -> str:
    import urllib.request

    with urllib.request.urlopen(api.rstrip("/") + "/health", timeout=3) as resp:
        return f"healthy (HTTP {resp.status})"


def _embedded_prior() -> str:
    from t3d.priors import prior_identity

    return prior_identity("embedded")


def _tcnn_smoke(device) -> None:
    import tinycudann as tcnn
    import torch

    enc = tcnn.Encoding(3, {"otype": "HashGrid", "n_levels": 2, "n_features_per_level": 2, "log2_hashmap_size": 12, "base_resolution": 4, "per_level_scale": 2.0})
    x = torch.rand(128, 3, device=device, requires_grad=True)
    enc(x).float().sum().backward()
    torch.cuda.synchronize()


def _nvdiffrast_smoke(device) -> None:
    import torch

    from t3d.raster import import_nvdiffrast

    dr = import_nvdiffrast()

    ctx = dr.RasterizeCudaContext(device=device)
    pos = torch.tensor([[[-0.5, -0.5, 0, 1], [0.5, -0.5, 0, 1], [0, 0.5, 0, 1]]], device=device, dtype=torch.float32)
    tri = torch.tensor([[0, 1, 2]], device=device, dtype=torch.int32)
    rast, _ = dr.rasterize(ctx, pos, tri, resolution=[16, 16])
    assert rast[..., 3].max() > 0
    torch.cuda.synchronize()
