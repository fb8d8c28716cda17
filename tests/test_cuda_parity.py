"""CUDA libraries against their pure-torch twins, on the same inputs: nvdiffrast against the torch
rasterizer, tinycudann's HashGrid against t3d.fields.hashgrid.TorchHashGrid (same table contents).

Skipped without CUDA, and each library's tests without that library. With T3D_PARITY_JSON=path
set, every test appends one JSON line of the numbers it measured to that file
(scripts/device_check.sh reads them into its summary).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from t3d.fields.hashgrid import (
    DEFAULT_CPU_CONFIG,
    INSTANT_NGP_CONFIG,
    TcnnHashGrid,
    TorchHashGrid,
    choose_hashgrid,
    n_params,
)
from t3d.render.cameras import make_cameras
from t3d.render.raster import NvdiffrastRaster, TorchRaster, choose_raster, mvp_matrices

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# The GPU config of bench/sds_step.py --sd21 (Instant-NGP's): 16 levels, 2^19 entries per level.
GPU_GRID = INSTANT_NGP_CONFIG
SMALL_GRID = {
    "otype": "HashGrid",
    "n_levels": 4,
    "n_features_per_level": 4,
    "log2_hashmap_size": 12,
    "base_resolution": 4,
    "per_level_scale": 2.0,
}


def report(name: str, **numbers) -> None:
    """Print the measured numbers, and append them to $T3D_PARITY_JSON when it is set."""
    row = {"test": name, **{k: (round(v, 8) if isinstance(v, float) else v) for k, v in numbers.items()}}
    print(json.dumps(row))
    path = os.environ.get("T3D_PARITY_JSON")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are 0)."""
    a, b = a.detach(), b.detach()
    den = float(b.double().norm())
    num = float((a.double() - b.double()).norm())
    return num / den if den > 0 else num


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


# ------------------------------------------------------------------------------ nvdiffrast


@pytest.fixture(scope="module")
def nv_raster():
    pytest.importorskip("nvdiffrast.torch")
    raster = choose_raster("auto", "cuda")
    if not isinstance(raster, NvdiffrastRaster):
        pytest.skip(f"nvdiffrast unusable here: {raster.choice.reason}")
    return raster


def _sphere_clip(batch: int = 2, subdivisions: int = 4):
    import trimesh

    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.6)
    v = torch.tensor(m.vertices, dtype=torch.float32, device="cuda")
    f = torch.tensor(m.faces, dtype=torch.int32, device="cuda")
    cams = make_cameras([15.0 + i * 360.0 / batch for i in range(batch)], [20.0] * batch, 2.5, 40.0)
    mvp = mvp_matrices(cams).cuda()
    pos = torch.einsum("bij,vj->bvi", mvp, torch.cat([v, torch.ones_like(v[:, :1])], -1)).contiguous()
    return v, f, pos


def test_nvdiffrast_rasterize_and_interpolate_match_torch(nv_raster):
    v, f, pos0 = _sphere_clip()
    twin = TorchRaster("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    attr = torch.rand(1, v.shape[0], 5, device="cuda", generator=g)
    outs = {}
    for name, raster in (("nvdiffrast", nv_raster), ("torch", twin)):
        pos = pos0.clone().requires_grad_(True)
        a = attr.clone().requires_grad_(True)
        rast, _ = raster.rasterize(pos, f, (192, 192))
        out, _ = raster.interpolate(a, rast, f)
        outs[name] = (pos, a, rast, out)
    pos_n, a_n, rast_n, out_n = outs["nvdiffrast"]
    pos_t, a_t, rast_t, out_t = outs["torch"]
    id_n, id_t = rast_n[..., 3], rast_t[..., 3]
    same = (id_n == id_t) & (id_n > 0)
    # gradients through the pixels both backends give the same triangle only
    w = torch.rand(out_n.shape, device="cuda", generator=g) * same[..., None]
    (out_n * w).sum().backward()
    (out_t * w).sum().backward()
    numbers = {
        "pixels": int(id_n.numel()),
        "covered_fraction": float((id_t > 0).float().mean()),
        "triangle_id_differs": float((id_n != id_t).float().mean()),
        "coverage_differs": float(((id_n > 0) != (id_t > 0)).float().mean()),
        "max_abs_bary_diff": max_abs(rast_n[..., :2][same], rast_t[..., :2][same]),
        "max_abs_zw_diff": max_abs(rast_n[..., 2][same], rast_t[..., 2][same]),
        "max_abs_interp_diff": max_abs(out_n[same], out_t[same]),
        "attr_grad_rel_err": rel_err(a_n.grad, a_t.grad),
        "pos_grad_rel_err": rel_err(pos_n.grad, pos_t.grad),
    }
    report("nvdiffrast_rasterize_interpolate", **numbers)
    assert numbers["triangle_id_differs"] < 0.02 and numbers["coverage_differs"] < 0.01
    assert numbers["max_abs_bary_diff"] < 2e-3 and numbers["max_abs_interp_diff"] < 2e-3
    assert numbers["attr_grad_rel_err"] < 1e-3
    assert numbers["pos_grad_rel_err"] < 5e-2


@pytest.mark.parametrize("boundary_mode", ["wrap", "clamp"])
def test_nvdiffrast_texture_matches_torch(nv_raster, boundary_mode):
    g = torch.Generator(device="cuda").manual_seed(1)
    tex0 = torch.rand(2, 64, 48, 3, device="cuda", generator=g)
    uv0 = torch.rand(2, 96, 96, 2, device="cuda", generator=g) * 1.6 - 0.3  # outside [0,1] too
    w = torch.rand(2, 96, 96, 3, device="cuda", generator=g)
    res = {}
    for name, raster in (("nvdiffrast", nv_raster), ("torch", TorchRaster("cuda"))):
        tex = tex0.clone().requires_grad_(True)
        uv = uv0.clone().requires_grad_(True)
        out = raster.texture(tex, uv, filter_mode="linear", boundary_mode=boundary_mode)
        (out * w).sum().backward()
        res[name] = (out.detach(), tex.grad, uv.grad)
    (o_n, gt_n, gu_n), (o_t, gt_t, gu_t) = res["nvdiffrast"], res["torch"]
    numbers = {
        "boundary_mode": boundary_mode,
        "max_abs_out_diff": max_abs(o_n, o_t),
        "tex_grad_rel_err": rel_err(gt_n, gt_t),
        "uv_grad_rel_err": rel_err(gu_n, gu_t),
    }
    report(f"nvdiffrast_texture_{boundary_mode}", **numbers)
    assert numbers["max_abs_out_diff"] < 1e-3
    assert numbers["tex_grad_rel_err"] < 1e-3
    assert numbers["uv_grad_rel_err"] < 2e-2  # bilinear weights are computed in different float orders


def test_nvdiffrast_antialias_close_to_torch(nv_raster):
    """The twin's antialiasing is its own design: same image away from silhouettes, similar blend
    and position gradient on them (numbers reported; loose bounds)."""
    v, f, pos0 = _sphere_clip(batch=2, subdivisions=3)
    rast, _ = nv_raster.rasterize(pos0, f, (128, 128))
    g = torch.Generator(device="cuda").manual_seed(2)
    color = (rast[..., 3:] > 0).float() * torch.rand(1, 1, 1, 3, device="cuda", generator=g)
    res = {}
    for name, raster in (("nvdiffrast", nv_raster), ("torch", TorchRaster("cuda"))):
        pos = pos0.clone().requires_grad_(True)
        out = raster.antialias(color.contiguous(), rast, pos, f)
        out.sum().backward()
        res[name] = (out.detach(), pos.grad)
    (o_n, gp_n), (o_t, gp_t) = res["nvdiffrast"], res["torch"]
    changed_n = (o_n != color).any(-1)
    changed_t = (o_t != color).any(-1)
    cos = float(torch.nn.functional.cosine_similarity(gp_n.flatten(), gp_t.flatten(), dim=0))
    numbers = {
        "pixels_changed_nvdiffrast": int(changed_n.sum()),
        "pixels_changed_torch": int(changed_t.sum()),
        "mean_abs_diff": float((o_n - o_t).abs().mean()),
        "max_abs_diff": max_abs(o_n, o_t),
        "pos_grad_cosine": cos,
        "pos_grad_norm_ratio": float(gp_t.norm() / gp_n.norm()) if float(gp_n.norm()) > 0 else None,
    }
    report("nvdiffrast_antialias", **numbers)
    interior = ~(changed_n | changed_t)
    assert torch.equal(o_n[interior], o_t[interior])
    assert numbers["mean_abs_diff"] < 0.01
    assert cos > 0.3, "position gradients from antialiasing point in unrelated directions"


# ------------------------------------------------------------------------------ tinycudann


@pytest.fixture(scope="module")
def tcnn():
    try:
        import tinycudann
    except Exception as exc:  # ImportError, or EnvironmentError from a build for another GPU
        pytest.skip(f"tinycudann not importable: {type(exc).__name__}: {exc}")
    return tinycudann


@pytest.mark.parametrize(
    "name,config", [("cpu_default", DEFAULT_CPU_CONFIG), ("small_f4", SMALL_GRID), ("gpu_sd21", GPU_GRID)]
)
def test_tcnn_hashgrid_matches_torch_twin(tcnn, name, config):
    torch.manual_seed(0)
    twin = TorchHashGrid(3, config).cuda()
    fast = TcnnHashGrid(3, config).cuda()
    assert fast.params.numel() == twin.params.numel() == n_params(config)
    with torch.no_grad():  # same table, with values large enough for any index error to show
        twin.params.uniform_(-1.0, 1.0)
        fast.params.copy_(twin.params)
    g = torch.Generator(device="cuda").manual_seed(3)
    x0 = torch.rand(1 << 16, 3, device="cuda", generator=g) * 0.998 + 0.001
    up = torch.randn(x0.shape[0], twin.n_output_dims, device="cuda", generator=g)
    res = {}
    for key, mod in (("tcnn", fast), ("torch", twin)):
        x = x0.clone().requires_grad_(True)
        y = mod(x)
        (y * up).sum().backward()
        res[key] = (y.detach(), mod.params.grad.detach().clone(), x.grad.detach().clone())
        mod.params.grad = None
    (y_c, gp_c, gx_c), (y_t, gp_t, gx_t) = res["tcnn"], res["torch"]
    numbers = {
        "config": name,
        "n_params": int(twin.params.numel()),
        "points": int(x0.shape[0]),
        "max_abs_out_diff": max_abs(y_c, y_t),
        "out_rel_err": rel_err(y_c, y_t),
        "params_grad_rel_err": rel_err(gp_c, gp_t),
        "params_grad_max_abs_diff": max_abs(gp_c, gp_t),
        "input_grad_rel_err": rel_err(gx_c, gx_t),
    }
    report(f"tcnn_hashgrid_{name}", **numbers)
    assert numbers["max_abs_out_diff"] < 1e-4
    assert numbers["params_grad_rel_err"] < 1e-4
    assert numbers["input_grad_rel_err"] < 1e-2  # tcnn's d/dx uses its own (fast-math) arithmetic


def test_tcnn_state_dict_loads_into_torch_twin(tcnn):
    fast = TcnnHashGrid(3, SMALL_GRID, seed=5).cuda()
    twin = TorchHashGrid(3, SMALL_GRID).cuda()
    twin.load_state_dict(fast.state_dict())
    x = torch.rand(4096, 3, device="cuda")
    with torch.no_grad():
        diff = max_abs(fast(x), twin(x))
    report("tcnn_state_dict_roundtrip", max_abs_out_diff=diff)
    assert diff < 1e-5


def test_tcnn_is_chosen_on_cuda(tcnn):
    hashgrid = choose_hashgrid("auto", "cuda")
    report("tcnn_backend_choice", **hashgrid.choice.as_dict())
    assert hashgrid.choice.backend == "tinycudann", hashgrid.choice.reason
    assert isinstance(hashgrid.encoding(SMALL_GRID), TcnnHashGrid)


def test_tcnn_field_loads_on_the_torch_twin_and_back(tcnn, tmp_path):
    """Artifacts never pin a backend: a field saved with tinycudann loads on the torch twin (a CPU
    worker's case, here on the GPU to compare outputs), and one saved with the twin loads on tinycudann."""
    from t3d.fields.nerf import FieldParams, NeRFField, load_field, save_field

    fast = choose_hashgrid("auto", "cuda")
    if fast.choice.backend != "tinycudann":
        pytest.skip(f"tinycudann unusable here: {fast.choice.reason}")
    twin = choose_hashgrid("torch", "cuda")
    x = torch.rand(4096, 3, device="cuda") * 1.6 - 0.8
    diffs = {}
    for name, write, read in (("tcnn_to_torch", fast, twin), ("torch_to_tcnn", twin, fast)):
        field = NeRFField(FieldParams(grid=SMALL_GRID, bound=1.0), write)
        with torch.no_grad():
            field.encoding.params.uniform_(-1.0, 1.0)
        save_field(field, tmp_path / name)
        loaded = load_field(tmp_path / name, read)
        assert loaded.backend == read.choice and type(loaded.encoding) is not type(field.encoding)
        with torch.no_grad():
            diffs[name] = max(max_abs(a, b) for a, b in zip(field.query(x), loaded.query(x), strict=True))
    report("field_across_hashgrid_backends", **diffs)
    assert max(diffs.values()) < 1e-3  # the grid agrees to 1e-4 (above); the MLP adds float error


def test_twin_speed_against_tcnn(tcnn):
    """Forward+backward time of each on the GPU config (reported, not asserted)."""
    fast = TcnnHashGrid(3, GPU_GRID).cuda()
    twin = TorchHashGrid(3, GPU_GRID).cuda()
    x = torch.rand(1 << 18, 3, device="cuda")
    times = {}
    for key, mod in (("tcnn", fast), ("torch", twin)):
        for i in range(6):
            if i == 1:
                torch.cuda.synchronize()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
            mod(x).square().sum().backward()
        end.record()
        torch.cuda.synchronize()
        times[f"{key}_fwd_bwd_ms"] = start.elapsed_time(end) / 5
    report(
        "hashgrid_speed_262k_points", **times, speedup=times["torch_fwd_bwd_ms"] / max(times["tcnn_fwd_bwd_ms"], 1e-9)
    )
    assert np.isfinite(list(times.values())).all()
