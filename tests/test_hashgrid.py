"""The pure-torch hash grid against tinycudann's semantics, worked out by hand on tiny grids."""

from __future__ import annotations

import math

import pytest
import torch

from t3d.fields.hashgrid import (
    DEFAULT_CPU_CONFIG,
    INSTANT_NGP_CONFIG,
    TorchHashGrid,
    choose_hashgrid,
    level_layout,
    n_params,
)

# Level 0: scale 3*1-1 = 2, resolution 3, 27 entries -> table 32 (multiple of 8): dense.
# Level 1: scale 3*4-1 = 11, resolution 12, 1728 entries > 2^6: hashed, table 64.
TINY = {
    "otype": "HashGrid",
    "n_levels": 2,
    "n_features_per_level": 1,
    "log2_hashmap_size": 6,
    "base_resolution": 3,
    "per_level_scale": 4.0,
}


def _grid_with_index_values(config=TINY) -> TorchHashGrid:
    """params[i] = i, so every lookup returns the flat row it read: the index is visible."""
    grid = TorchHashGrid(3, config)
    with torch.no_grad():
        grid.params.copy_(torch.arange(grid.params.numel(), dtype=torch.float32))
    return grid


def test_tiny_layout_by_hand():
    lv = level_layout(TINY)
    assert [(lvl["scale"], lvl["resolution"], lvl["size"], lvl["offset"], lvl["dense"]) for lvl in lv] == [
        (2.0, 3, 32, 0, True),
        (11.0, 12, 64, 32, False),
    ]
    assert n_params(TINY) == 96
    assert TorchHashGrid(3, TINY).params.shape == (96,)


def test_dense_level_by_hand():
    grid = _grid_with_index_values()
    # x = (0.25, 0.5, 0.75) -> pos = x*2 + 0.5 = (1.0, 1.5, 2.0): cell (1,1,2), frac (0, .5, 0)
    # corners (1,1,2) and (1,2,2), weight 1/2 each; dense index x + 3y + 9z = 22 and 25.
    out = grid(torch.tensor([[0.25, 0.5, 0.75]]))
    assert out.shape == (1, 2)
    assert out[0, 0].item() == pytest.approx(0.5 * 22 + 0.5 * 25)


def test_dense_level_wraps_like_tinycudann():
    grid = _grid_with_index_values()
    # x = (1,1,1) -> pos 2.5: corners {2,3}^3, dense indices 26,27,29,30,35,36,38,39; those past the
    # 32-entry table wrap (index % 32 -> 3,4,6,7) exactly as tinycudann's modulo does.
    out = grid(torch.ones(1, 3))
    assert out[0, 0].item() == pytest.approx((26 + 27 + 29 + 30 + 3 + 4 + 6 + 7) / 8)


def test_hashed_level_by_hand():
    grid = _grid_with_index_values()
    # Level 1: pos = x*11 + 0.5 = (3.25, 6.0, 8.75): cell (3,6,8), frac (.25, 0, .75).
    # hash = x*1 ^ y*2654435761 ^ z*805459861 (uint32), % 64:
    #   6*2654435761 mod 2^32 = 3041712678 -> low 6 bits 38
    #   8*805459861  mod 2^32 = 2148711592 -> 40;   9*805459861 mod 2^32 = 2954171453 -> 61
    #   (3,6,8): 3^38^40 = 13   (4,6,8): 4^38^40 = 10   (3,6,9): 3^38^61 = 24   (4,6,9): 4^38^61 = 31
    # weights .75*.25, .25*.25, .75*.75, .25*.75; the level's rows start at offset 32.
    assert (6 * 2654435761) % 2**32 == 3041712678 and 3041712678 % 64 == 38
    assert (8 * 805459861) % 2**32 % 64 == 40 and (9 * 805459861) % 2**32 % 64 == 61
    expected = 32 + 0.1875 * 13 + 0.0625 * 10 + 0.5625 * 24 + 0.1875 * 31
    assert expected == 54.375
    out = grid(torch.tensor([[0.25, 0.5, 0.75]]))
    assert out[0, 1].item() == pytest.approx(expected)


def _reference(grid: TorchHashGrid, x: torch.Tensor) -> torch.Tensor:
    """Scalar Python transcription of tinycudann's kernel_grid (uint32 maths), for random points."""
    table = grid.params.detach().view(-1, grid.n_features_per_level).double()
    primes = (1, 2654435761, 805459861)
    out = torch.zeros(x.shape[0], grid.n_output_dims, dtype=torch.float64)
    for i in range(x.shape[0]):
        for li, lv in enumerate(grid.levels):
            pos = [
                float(
                    torch.tensor(x[i, d].item(), dtype=torch.float32) * torch.tensor(lv["scale"], dtype=torch.float32)
                    + 0.5
                )
                for d in range(3)
            ]
            cell = [math.floor(p) for p in pos]
            frac = [p - c for p, c in zip(pos, cell)]
            for k in range(8):
                c = [cell[d] + ((k >> d) & 1) for d in range(3)]
                w = math.prod(frac[d] if (k >> d) & 1 else 1 - frac[d] for d in range(3))
                if lv["resolution"] ** 3 <= lv["size"]:
                    index = c[0] + c[1] * lv["resolution"] + c[2] * lv["resolution"] ** 2
                else:
                    index = 0
                    for d in range(3):
                        index ^= (c[d] * primes[d]) % 2**32
                row = lv["offset"] + index % lv["size"]
                out[i, li * grid.n_features_per_level : (li + 1) * grid.n_features_per_level] += w * table[row]
    return out


def test_random_points_match_scalar_reference():
    cfg = {
        "otype": "HashGrid",
        "n_levels": 4,
        "n_features_per_level": 2,
        "log2_hashmap_size": 9,
        "base_resolution": 4,
        "per_level_scale": 1.9,
    }
    grid = TorchHashGrid(3, cfg, seed=3)
    with torch.no_grad():
        grid.params.normal_(generator=torch.Generator().manual_seed(1))
    assert [lv["dense"] for lv in grid.levels] == [True, True, False, False]
    x = torch.rand(40, 3, generator=torch.Generator().manual_seed(2))
    x[0] = 0.0
    x[1] = 1.0
    torch.testing.assert_close(grid(x).double(), _reference(grid, x), atol=2e-5, rtol=1e-5)


def _tcnn_n_params(config: dict) -> int:
    """tinycudann's GridEncoding constructor, transcribed: per level next_multiple(res^3, 8) capped at 2^log2."""
    total = 0
    for level in range(config["n_levels"]):
        scale = 2.0 ** (level * math.log2(config["per_level_scale"])) * config["base_resolution"] - 1.0
        res = math.ceil(scale) + 1
        total += min(-(-(res**3) // 8) * 8, 2 ** config["log2_hashmap_size"])
    return total * config["n_features_per_level"]


@pytest.mark.parametrize(
    "config",
    [
        DEFAULT_CPU_CONFIG,
        INSTANT_NGP_CONFIG,
        {
            "otype": "HashGrid",
            "n_levels": 5,
            "n_features_per_level": 4,
            "log2_hashmap_size": 12,
            "base_resolution": 3,
            "per_level_scale": 2.0,
        },
    ],
)
def test_flat_parameter_count_matches_tinycudann_formula(config):
    assert n_params(config) == _tcnn_n_params(config)


def test_parameter_layout_is_level_entry_feature():
    grid = TorchHashGrid(3, TINY | {"n_features_per_level": 2})
    lv = grid.levels
    x = torch.tensor([[0.25, 0.5, 0.75]])
    with torch.no_grad():
        grid.params.zero_()
        # Level 1, row 13 (corner (3,6,8), weight .1875), feature 1 -> flat (32 + 13) * 2 + 1.
        grid.params[(lv[1]["offset"] + 13) * 2 + 1] = 1.0
    out = grid(x)[0]
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.0, 0.1875]))


def test_init_and_state_dict():
    grid = TorchHashGrid(3, DEFAULT_CPU_CONFIG, seed=0)
    assert list(grid.state_dict()) == ["params"]
    assert grid.params.abs().max() <= 1e-4 and grid.params.std() > 3e-5
    other = TorchHashGrid(3, DEFAULT_CPU_CONFIG, seed=1)
    other.load_state_dict(grid.state_dict())
    x = torch.rand(16, 3)
    torch.testing.assert_close(other(x), grid(x))


def test_gradients_reach_table_and_inputs():
    grid = TorchHashGrid(3, TINY | {"n_features_per_level": 2}, seed=0)
    with torch.no_grad():
        grid.params.normal_(generator=torch.Generator().manual_seed(0))
    x = (torch.rand(6, 3, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1).requires_grad_(True)
    v = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    (grid(x) * v).sum().backward()
    # Table gradient: linear in the table, so it equals the autograd of a dense reference.
    table = grid.params.detach().clone().requires_grad_(True)
    ref = _LinearProbe(grid, x.detach())
    (ref(table) * v).sum().backward()
    torch.testing.assert_close(grid.params.grad, table.grad)
    # Input gradient against central differences.
    eps = 1e-3
    fd = torch.stack(
        [((grid(x.detach() + e) - grid(x.detach() - e)) * v).sum(1) / (2 * eps) for e in torch.eye(3) * eps], 1
    )
    torch.testing.assert_close(x.grad, fd, atol=2e-2, rtol=2e-3)


class _LinearProbe:
    """Output as an explicit function of the table (via the module's own indices and weights)."""

    def __init__(self, grid, x):
        self.grid, self.x = grid, x

    def __call__(self, table):
        g = self.grid
        saved = g.params.data
        outs = []
        basis = torch.eye(table.numel())
        with torch.no_grad():
            for i in range(table.numel()):
                g.params.data = basis[i]
                outs.append(g(self.x))
        g.params.data = saved
        jac = torch.stack(outs, -1)  # [N, out, P]
        return jac @ table


def test_backend_switch_on_cpu():
    auto = choose_hashgrid("auto", "cpu")
    assert auto.choice.backend == "torch" and auto.choice.reason == "device is cpu"
    grid = auto.encoding(TINY, seed=3)
    assert isinstance(grid, TorchHashGrid) and grid.params.device.type == "cpu"
    assert torch.equal(grid.params, TorchHashGrid(3, TINY, seed=3).params)  # the seed reaches the table
    assert choose_hashgrid("torch", "cpu").choice.reason == "requested"
    with pytest.raises(RuntimeError, match="needs CUDA"):
        choose_hashgrid("tinycudann", "cpu")
    with pytest.raises(ValueError, match="auto, tinycudann or torch"):
        choose_hashgrid("cuda-library", "cpu")


def test_tcnn_import_failure_is_handled():
    try:
        import tinycudann  # noqa: F401
    except (ImportError, OSError):
        pass
    else:  # pragma: no cover - only on a CUDA machine with tinycudann
        pytest.skip("tinycudann is importable here")
    from t3d.fields.hashgrid import _tcnn_smoke

    with pytest.raises((ImportError, EnvironmentError, OSError)):
        _tcnn_smoke(torch.device("cpu"))


def test_unsupported_configs_are_rejected():
    with pytest.raises(ValueError):
        TorchHashGrid(3, {"otype": "DenseGrid"})
    with pytest.raises(ValueError):
        TorchHashGrid(3, TINY | {"interpolation": "Smoothstep"})
    with pytest.raises(ValueError):
        TorchHashGrid(3, TINY)(torch.rand(4, 2))


def test_chunked_forward_equals_single_pass():
    grid = TorchHashGrid(3, DEFAULT_CPU_CONFIG, chunk=100)
    x = torch.rand(1000, 3)
    whole = TorchHashGrid(3, DEFAULT_CPU_CONFIG)
    whole.load_state_dict(grid.state_dict())
    torch.testing.assert_close(grid(x), whole(x))
