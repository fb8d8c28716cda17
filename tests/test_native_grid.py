"""The hash grid's fused C kernel against its pure-torch path: same features, same table gradient."""

from __future__ import annotations

import pytest
import torch

from t3d.fields import native_grid
from t3d.fields.hashgrid import DEFAULT_CPU_CONFIG, TorchHashGrid

pytestmark = pytest.mark.skipif(native_grid.load() is None, reason="no C compiler: the kernel cannot be built")

CONFIGS = [
    (3, DEFAULT_CPU_CONFIG),  # what the coarse stage trains: dense and hashed levels
    (
        3,
        {
            "otype": "HashGrid",
            "n_levels": 6,
            "n_features_per_level": 1,
            "log2_hashmap_size": 10,
            "base_resolution": 4,
            "per_level_scale": 2.0,
        },
    ),
    (
        2,
        {
            "otype": "HashGrid",
            "n_levels": 4,
            "n_features_per_level": 4,
            "log2_hashmap_size": 8,
            "base_resolution": 4,
            "per_level_scale": 2.5,
        },
    ),
]


def _features_and_grad(grid: TorchHashGrid, x: torch.Tensor, v: torch.Tensor, native: bool, monkeypatch):
    monkeypatch.setenv("T3D_NATIVE_KERNELS", "1" if native else "0")
    grid.params.grad = None
    y = grid(x)
    (y * v).sum().backward()
    return y.detach(), grid.params.grad.clone()


@pytest.mark.parametrize(("dims", "config"), CONFIGS)
def test_native_kernel_equals_torch_path(dims, config, monkeypatch):
    grid = TorchHashGrid(dims, config, seed=0)
    with torch.no_grad():
        grid.params.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.rand(3000, dims, generator=torch.Generator().manual_seed(1)) * 1.2 - 0.1  # some outside [0,1]
    x[0], x[1] = 0.0, 1.0
    v = torch.randn(3000, grid.n_output_dims, generator=torch.Generator().manual_seed(2))
    y_torch, g_torch = _features_and_grad(grid, x, v, False, monkeypatch)
    y_native, g_native = _features_and_grad(grid, x, v, True, monkeypatch)
    assert grid._layout is not None  # the native path really ran
    torch.testing.assert_close(y_native, y_torch, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_native, g_torch, atol=1e-5, rtol=1e-6)
    assert g_native.abs().sum() > 0


@pytest.mark.parametrize(("dims", "config"), CONFIGS)
def test_input_gradient_equals_torch_path(dims, config, monkeypatch):
    """Finite-difference normals differentiate the grid w.r.t. its inputs: both paths agree."""
    grid = TorchHashGrid(dims, config, seed=0)
    with torch.no_grad():
        grid.params.normal_(generator=torch.Generator().manual_seed(3))
    x0 = torch.rand(2000, dims, generator=torch.Generator().manual_seed(4))
    v = torch.randn(2000, grid.n_output_dims, generator=torch.Generator().manual_seed(5))
    grads = {}
    for native in (False, True):
        monkeypatch.setenv("T3D_NATIVE_KERNELS", "1" if native else "0")
        x = x0.clone().requires_grad_(True)
        grid.params.grad = None
        (grid(x) * v).sum().backward()
        grads[native] = (x.grad, grid.params.grad.clone())
    assert grid._layout is not None
    torch.testing.assert_close(grads[True][0], grads[False][0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grads[True][1], grads[False][1], atol=1e-5, rtol=1e-6)
    assert grads[True][0].abs().sum() > 0


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("T3D_NATIVE_KERNELS", "0")
    assert native_grid.load() is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="doctor shows the CPU kernel only without CUDA")
def test_doctor_says_whether_cpu_runs_get_the_kernel(monkeypatch):
    from t3d.cli.doctor import checks

    def row():
        return next(r for r in checks() if r[0] == "CPU hash-grid kernel")

    monkeypatch.setenv("T3D_NATIVE_KERNELS", "0")
    assert row()[1] is False and "T3D_NATIVE_KERNELS=0" in row()[2]
    monkeypatch.setenv("T3D_NATIVE_KERNELS", "1")
    monkeypatch.setattr(native_grid, "_compiler", lambda: None)
    assert row()[1] is False and "no C compiler" in row()[2]
