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
    rows.append(("CUDA", cuda, torch.cuda.get_device_name(0) if cuda else _no_cuda()))
    free = None
    if cuda:
        ok, got = _try(torch.cuda.mem_get_info)
        if ok:
            free, total = got
            rows.append(("GPU memory", True, f"{free / GIB:.1f} GiB free of {total / GIB:.1f} GiB"))
        else:
            rows.append(("GPU memory", False, f"cannot read it: {got}"))
    if cuda and free is None:
        rows.append(
            ("compute profile", True, "free GPU memory unknown: compute: {profile: low-memory} is the safe choice")
        )
    else:
        rows.append(("compute profile", True, recommend_profile(free)))

    # the choosers a run uses, with their real smoke ops: what doctor says is what a run gets
    from t3d.fields.hashgrid import choose_hashgrid
    from t3d.render.raster import choose_raster

    device = torch.device("cuda" if cuda else "cpu")
    for lib, choose, cost in (
        (
            "tinycudann",
            choose_hashgrid,
            "hash grid falls back to the pure-torch twin (same results, several times slower)",
        ),
        ("nvdiffrast", choose_raster, "rasterizer falls back to the pure-torch twin (slower at high resolution)"),
    ):
        choice = choose("auto", device).choice
        ok = choice.backend == lib
        fix = f"; install: {INSTALL[lib]}" if cuda else f"; with a GPU and CUDA torch: {INSTALL[lib]}"
        rows.append((lib, ok, "smoke op passed" if ok else f"{choice.reason}; {cost}{fix}"))

    if not cuda:
        rows.append(("CPU hash-grid kernel", *_native_kernel()))

    for mod in ("diffusers", "transformers", "peft", "prefect", "trimesh", "xatlas", "mcubes"):
        ok, detail = _try(lambda m=mod: __import__(m).__dict__.get("__version__", "installed"))
        rows.append((mod, ok, str(detail) if ok else f"{detail}; `bash scripts/install.sh` installs it"))

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
        from t3d.flows.server import STATE_FILE, default_data_dir

        data = default_data_dir()
        running = (data / STATE_FILE).exists()
        rows.append(
            (
                "Prefect API",
                True,
                f"none configured: runs share t3d's local server in {data} "
                f"({'running now' if running else 'started by the first run that needs it'}); `t3d server` adds the UI",
            )
        )
    return rows


GIB = 2**30

# The command that fixes each missing piece (run inside the repo; `.venv/bin/pip` is the project's pip).
INSTALL = {
    "cuda-torch": "T3D_CUDA=1 bash scripts/install.sh",
    "nvdiffrast": "`.venv/bin/pip install diffrp-nvdiffrast` (needs nvcc + ninja; torch builds it on first use)",
    "tinycudann": (
        '`.venv/bin/pip install "git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch"` '
        "(needs nvcc; builds for minutes)"
    ),
}


def _native_kernel() -> tuple[bool, str]:
    """Whether CPU runs get the fused C hash-grid kernel (about half an SDS step) or the torch path."""
    from t3d.fields import native_grid

    if os.environ.get("T3D_NATIVE_KERNELS", "1") == "0":
        return False, "off (T3D_NATIVE_KERNELS=0): the pure-torch path runs, about 2x slower per SDS step"
    if native_grid._compiler() is None:
        return False, "no C compiler (cc, gcc or $CC): the pure-torch path runs; install gcc for ~2x faster CPU steps"
    ok = native_grid.load() is not None
    return ok, "compiled and loaded" if ok else "the build failed (see the warning above): the pure-torch path runs"


def _no_cuda() -> str:
    import torch

    if torch.version.cuda is None:
        return (
            f"none: torch {torch.__version__} is a CPU build; `{INSTALL['cuda-torch']}` installs a CUDA build "
            "(on a machine with an NVIDIA GPU). Stages run on the CPU meanwhile (fine for the toy prior; "
            "SD-sized priors need a GPU)"
        )
    return (
        f"none: torch is built for CUDA {torch.version.cuda} but sees no GPU (driver, CUDA_VISIBLE_DEVICES); "
        "stages run on the CPU"
    )


def recommend_profile(free_bytes: int | None) -> str:
    """Which flow.yaml `compute:` to use, from the GPU memory free now (None: no GPU).

    The thresholds come from the fp16 SDS step of an SD-2.1-sized UNet and VAE at 512 px, batch 1,
    measured at a 4.0 GiB peak on an H200 (README, "On a GPU"); real weights add the text encoder
    (~0.7 GiB in fp16), and VSD holds a second UNet (its LoRA copy) and trains it.
    """
    if free_bytes is None:
        return (
            "no GPU: compute: options other than precision do nothing useful here "
            "(precision: auto is fp32 on a CPU; bf16 works but is slow)"
        )
    free = free_bytes / GIB
    if free >= 24:
        return (
            f"{free:.0f} GiB free: the defaults (no compute: block; precision auto = fp16 on CUDA): "
            "an SD-2.1-sized fp16 SDS step at 512 px peaked at 4.0 GiB"
        )
    if free >= 8:
        return (
            f"{free:.0f} GiB free: compute: {{profile: low-memory}} (VAE slicing, the text encoder and the VAE's "
            "decoder wait on the CPU; precision auto is already fp16 on CUDA)"
        )
    return (
        f"{free:.1f} GiB free: compute: {{profile: low-memory}}, and SD 2.1 at 512 px may not fit (an fp16 "
        "SDS step peaked at 4.0 GiB "
        "before its text encoder's weights; VSD needs more): keep batch_size 1, or free the GPU"
    )


def _ping(api: str) -> str:
    import urllib.request

    with urllib.request.urlopen(api.rstrip("/") + "/health", timeout=3) as resp:
        return f"healthy (HTTP {resp.status})"


def _embedded_prior() -> str:
    from t3d.priors import prior_identity

    return prior_identity("embedded")
