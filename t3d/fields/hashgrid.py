"""Multi-resolution hash grid encoding (Instant-NGP), with tinycudann and a pure-torch twin.

Both modules take tinycudann's encoding config (otype "HashGrid", n_levels, n_features_per_level,
log2_hashmap_size, base_resolution, per_level_scale), map x [N,3] in [0,1] to features
[N, n_levels * n_features_per_level] (float32, level-major) and keep every table in ONE flat
parameter `params` laid out as tinycudann does: level-major, then table entry, then feature. A
state_dict saved by one backend therefore loads into the other.

Semantics, as in tiny-cuda-nn's encodings/grid.h:
  scale_l      = 2^(l * log2(per_level_scale)) * base_resolution - 1     (float32)
  resolution_l = ceil(scale_l) + 1
  table_l      = min(next_multiple(resolution_l^d, 8), 2^log2_hashmap_size)
  pos          = x * scale_l + 0.5;  cell = floor(pos);  frac = pos - cell
  index        = dense (x + y*res + z*res^2) while res^d fits the table, else
                 XOR of coord * (1, 2654435761, 805459861) in uint32; then index % table_l
  output       = trilinear blend of the 2^d corner features;  init uniform(-1e-4, 1e-4)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from t3d.backends import BackendChoice, HashGridRequest, choose_backend, normalise_device
from t3d.fields import native_grid

PRIMES = (1, 2654435761, 805459861)

DEFAULT_CPU_CONFIG = {
    "otype": "HashGrid",
    "n_levels": 8,
    "n_features_per_level": 2,
    "log2_hashmap_size": 14,
    "base_resolution": 8,
    "per_level_scale": 1.5,  # 8 -> ~137 cells across the bound: finer than a pixel at 64 px
}
# Instant-NGP's grid (16 levels, 2^19 entries each): what GPU benches and the CUDA parity tests use.
INSTANT_NGP_CONFIG = {
    "otype": "HashGrid",
    "n_levels": 16,
    "n_features_per_level": 2,
    "log2_hashmap_size": 19,
    "base_resolution": 16,
    "per_level_scale": 1.447269237440378,
}


def _norm_config(config: dict) -> dict:
    cfg = dict(config)
    otype = str(cfg.get("otype", "HashGrid"))
    grid_type = str(cfg.get("type", "Hash"))
    if otype.lower() not in ("hashgrid", "grid") or grid_type.lower() != "hash":
        raise ValueError(f"only hash grids are supported, got otype={otype!r} type={grid_type!r}")
    interp = str(cfg.get("interpolation", "Linear"))
    if interp.lower() != "linear":
        raise ValueError(f"only 'Linear' interpolation is implemented in the torch twin, got {interp!r}")
    out = {
        "otype": "HashGrid",
        "n_levels": int(cfg.get("n_levels", 16)),
        "n_features_per_level": int(cfg.get("n_features_per_level", 2)),
        "log2_hashmap_size": int(cfg.get("log2_hashmap_size", 19)),
        "base_resolution": int(cfg.get("base_resolution", 16)),
        "per_level_scale": float(cfg.get("per_level_scale", 2.0)),
    }
    if out["n_features_per_level"] not in (1, 2, 4, 8):
        raise ValueError("n_features_per_level must be 1, 2, 4 or 8 (as in tinycudann)")
    if not 1 <= out["n_levels"] <= 32:
        raise ValueError("n_levels must be in 1..32")
    return out


def level_layout(config: dict, n_input_dims: int = 3) -> list[dict]:
    """Per level: scale (float32 as tinycudann computes it), resolution, table size, offset, dense."""
    cfg = _norm_config(config)
    log2_scale = np.float32(np.log2(np.float32(cfg["per_level_scale"])))
    hashmap = 1 << cfg["log2_hashmap_size"]
    levels, offset = [], 0
    max_params = np.iinfo(np.uint32).max // 2
    for level in range(cfg["n_levels"]):
        scale = np.float32(
            np.exp2(np.float32(level) * log2_scale) * np.float32(cfg["base_resolution"]) - np.float32(1.0)
        )
        res = int(math.ceil(float(scale))) + 1
        dense_size = res**n_input_dims
        size = max_params if float(res) ** n_input_dims > max_params else dense_size
        size = -(-size // 8) * 8  # aligned accesses
        size = min(size, hashmap)
        levels.append(
            {"scale": float(scale), "resolution": res, "size": size, "offset": offset, "dense": dense_size <= size}
        )
        offset += size
    return levels


def n_params(config: dict, n_input_dims: int = 3) -> int:
    """Length of the flat parameter vector, tinycudann's formula."""
    cfg = _norm_config(config)
    lv = level_layout(cfg, n_input_dims)
    return (lv[-1]["offset"] + lv[-1]["size"]) * cfg["n_features_per_level"]


class _CornerBlend(torch.autograd.Function):
    """out[r] = sum_k w[k,r] * table[idx[k,r]] with corner-major idx/w [K,R].

    Corner-major layout keeps every elementwise op on long contiguous rows (fast on CPU); the
    table gradient is scattered with bincount, which beats index_add_ and embedding_bag's
    backward on CPU by 2-10x.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(idx.shape[1], table.shape[1], dtype=table.dtype, device=table.device)
        for k in range(idx.shape[0]):
            out.addcmul_(table.index_select(0, idx[k]), w[k, :, None].to(table.dtype))
        ctx.save_for_backward(table, idx, w)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        table, idx, w = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_table = grad_w = None
        n_rows, n_feat = table.shape
        if ctx.needs_input_grad[0]:
            flat_idx = idx.reshape(-1)
            if table.device.type == "cpu":
                grad_table = torch.empty_like(table)
                for f in range(n_feat):
                    contrib = (w * grad_out[None, :, f]).reshape(-1)
                    grad_table[:, f] = torch.bincount(flat_idx, weights=contrib, minlength=n_rows).to(table.dtype)
            else:
                grad_table = torch.zeros_like(table)
                contrib = (w[..., None] * grad_out[None, :, :]).reshape(-1, n_feat)
                grad_table.index_add_(0, flat_idx.long(), contrib.to(table.dtype))
        if ctx.needs_input_grad[2]:
            grad_w = torch.stack([(table.index_select(0, idx[k]) * grad_out).sum(-1) for k in range(idx.shape[0])])
        return grad_table, None, grad_w


class TorchHashGrid(nn.Module):
    """Pure-torch twin of tinycudann's HashGrid encoding (same config, output and parameter layout)."""

    backend = "torch"

    def __init__(self, n_input_dims: int = 3, config: dict | None = None, seed: int = 0, chunk: int = 1 << 17):
        super().__init__()
        if n_input_dims not in (2, 3):
            raise ValueError("tinycudann grids take 2 or 3 input dims")
        self.config = _norm_config(config or DEFAULT_CPU_CONFIG)
        self.n_input_dims = n_input_dims
        self.n_levels = self.config["n_levels"]
        self.n_features_per_level = self.config["n_features_per_level"]
        self.n_output_dims = self.n_levels * self.n_features_per_level
        self.chunk = int(chunk)
        self._layout = None  # the C kernel's per-level constants, built on first use
        self.levels = level_layout(self.config, n_input_dims)
        total = n_params(self.config, n_input_dims)
        gen = torch.Generator().manual_seed(seed)
        self.params = nn.Parameter((torch.rand(total, generator=gen) * 2 - 1) * 1e-4)
        self.n_dense = sum(1 for lv in self.levels if lv["dense"])
        # Dense levels are the coarse ones and come first (resolution grows with the level).
        assert all(lv["dense"] for lv in self.levels[: self.n_dense])
        for name, key, dtype in [
            ("_scale", "scale", torch.float32),
            ("_res", "resolution", torch.int64),
            ("_size", "size", torch.int64),
            ("_offset", "offset", torch.int64),
        ]:
            self.register_buffer(name, torch.tensor([lv[key] for lv in self.levels], dtype=dtype), persistent=False)
        self.register_buffer("_primes", torch.tensor(PRIMES[:n_input_dims], dtype=torch.int64), persistent=False)
        res = self._res.view(-1, 1)
        self.register_buffer("_dense_stride", res ** torch.arange(n_input_dims).view(1, -1), persistent=False)
        if self.table.shape[0] >= 2**31:
            raise ValueError("hash grid too large for int32 row indices")
        if self.n_dense < self.n_levels and self.levels[self.n_dense]["size"] != 1 << self.config["log2_hashmap_size"]:
            raise AssertionError("a hashed level must use the full power-of-two table")

    def extra_repr(self) -> str:
        return f"n_input_dims={self.n_input_dims}, config={self.config}, n_params={self.params.numel()}"

    @property
    def table(self) -> torch.Tensor:
        """The flat parameters viewed as [total_entries, n_features_per_level] (a view, not a copy)."""
        return self.params.view(-1, self.n_features_per_level)

    def _indices(self, cells: list[torch.Tensor]) -> torch.Tensor:
        """Table row of every corner, corner-major [2^d, L, N] int32 (level offsets included).

        `cells[d]` [L,N] is floor(x_d * scale + 0.5) for inputs in [0,1], so corners lie in
        [0, resolution] and a dense index stays below 2 * table size: one conditional subtraction
        is tinycudann's modulo there. Hashed levels have a power-of-two table, so the uint32 hash
        modulo is a bit mask, applied per dimension (it commutes with XOR).
        """
        d, L, n = self.n_input_dims, self.n_levels, cells[0].shape[1]
        nd = self.n_dense
        mask = (1 << self.config["log2_hashmap_size"]) - 1
        terms = []  # per dim: [2, L, N] int32, corner bit 0 / 1
        for dim in range(d):
            c = cells[dim]
            t = torch.empty(2, L, n, dtype=torch.int32, device=c.device)
            if nd > 0:
                stride = self._dense_stride[:nd, dim : dim + 1]
                a = c[:nd] * stride
                t[0, :nd] = a
                t[1, :nd] = a + stride
            if nd < L:
                prime = PRIMES[dim]
                h = c[nd:] * prime
                t[0, nd:] = h & mask
                t[1, nd:] = (h + prime) & mask
            terms.append(t)
        out = torch.empty(2**d, L, n, dtype=torch.int32, device=cells[0].device)
        for k in range(2**d):
            parts = [terms[dim][(k >> dim) & 1] for dim in range(d)]
            if nd > 0:
                o = out[k, :nd]
                torch.add(parts[0][:nd], parts[1][:nd], out=o)
                for p in parts[2:]:
                    o += p[:nd]
            if nd < L:
                o = out[k, nd:]
                torch.bitwise_xor(parts[0][nd:], parts[1][nd:], out=o)
                for p in parts[2:]:
                    o ^= p[nd:]
        if nd > 0:
            dense = out[:, :nd]
            size = self._size[:nd].view(1, -1, 1).to(torch.int32)
            dense.sub_(torch.where(dense >= size, size, torch.zeros_like(size)))
        out += self._offset.view(1, -1, 1).to(torch.int32)
        return out

    def _weights(self, fracs: list[torch.Tensor]) -> torch.Tensor:
        """N-linear corner weights [2^d, L, N] in the corner order of `_indices` (differentiable)."""
        w = [1 - fracs[0], fracs[0]]
        for dim in range(1, self.n_input_dims):
            lo, hi = 1 - fracs[dim], fracs[dim]
            w = [x * lo for x in w] + [x * hi for x in w]  # corner bit `dim` is the high half
        return torch.stack(w)

    def _forward_chunk(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().clamp(0.0, 1.0)  # tinycudann's domain (tcnn wraps around outside it)
        n, L, d = x.shape[0], self.n_levels, self.n_input_dims
        scale = self._scale[:, None]
        cells, fracs = [], []
        for dim in range(d):
            pos = scale * x[None, :, dim] + 0.5  # [L,N], float32 as tcnn
            cell = torch.floor(pos.detach())
            cells.append(cell.long())
            fracs.append(pos - cell)  # carries d/dx when x needs a gradient (normals)
        with torch.no_grad():
            idx = self._indices(cells)
        w = self._weights(fracs)
        rows = _CornerBlend.apply(self.table, idx.view(2**d, L * n), w.view(2**d, L * n))
        return rows.view(L, n, self.n_features_per_level).transpose(0, 1).reshape(n, self.n_output_dims)

    def _native(self, x: torch.Tensor):
        """The fused C kernel when it applies: CPU, float32 table, 2 or 3 input dims."""
        if x.device.type != "cpu" or self.params.dtype != torch.float32:
            return None
        lib = native_grid.load()
        native_grid.keep_freed_memory()
        if lib is not None and self._layout is None:
            self._layout = native_grid.GridLayout(
                self.levels, self.n_input_dims, self.n_features_per_level, self.config["log2_hashmap_size"]
            )
        return lib

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.n_input_dims:
            raise ValueError(f"expected [N,{self.n_input_dims}] inputs, got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return x.new_zeros(0, self.n_output_dims, dtype=torch.float32)
        lib = self._native(x)
        if lib is not None:
            return native_grid.NativeEncode.apply(self.table, x.float().clamp(0.0, 1.0).contiguous(), self._layout, lib)
        if x.shape[0] <= self.chunk:
            return self._forward_chunk(x)
        return torch.cat([self._forward_chunk(c) for c in x.split(self.chunk)], 0)


class TcnnHashGrid(nn.Module):
    """tinycudann.Encoding behind the same interface: float32 out, one flat `params` at top level."""

    backend = "tinycudann"

    def __init__(self, n_input_dims: int = 3, config: dict | None = None, seed: int = 0):
        super().__init__()
        import tinycudann as tcnn  # raises EnvironmentError without a GPU

        self.config = _norm_config(config or DEFAULT_CPU_CONFIG)
        self.n_input_dims = n_input_dims
        self.n_levels = self.config["n_levels"]
        self.n_features_per_level = self.config["n_features_per_level"]
        self.n_output_dims = self.n_levels * self.n_features_per_level
        try:
            enc = tcnn.Encoding(n_input_dims, self.config, seed=seed, dtype=torch.float32)
        except TypeError:  # tinycudann builds before the dtype argument
            enc = tcnn.Encoding(n_input_dims, self.config, seed=seed)
        expected = n_params(self.config, n_input_dims)
        if enc.params.numel() != expected:
            raise RuntimeError(f"tinycudann has {enc.params.numel()} grid params, the layout formula says {expected}")
        # The tcnn module is kept out of the module tree so the only state is `params` (same key as
        # the torch twin); it gets our parameter right before every call.
        self._enc = [enc]
        self.params = nn.Parameter(enc.params.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self._enc[0]
        if next(enc.parameters(), self.params) is not self.params:
            enc.params = self.params
        return enc(x.float().contiguous()).float()


def _tcnn_smoke(device: torch.device) -> None:
    """Build the TcnnHashGrid a run would use, run it forward and backward, and check the result."""
    cfg = {
        "otype": "HashGrid",
        "n_levels": 2,
        "n_features_per_level": 2,
        "log2_hashmap_size": 10,
        "base_resolution": 4,
        "per_level_scale": 8.0,
    }
    grid = TcnnHashGrid(3, cfg).to(device)
    y = grid(torch.rand(256, 3, device=device))
    y.square().sum().backward()
    torch.cuda.synchronize(device)
    if y.shape != (256, 4) or grid.params.grad is None or not torch.isfinite(grid.params.grad).all():
        raise RuntimeError("tinycudann smoke op gave wrong shapes or non-finite gradients")


class HashGridBackend:
    """The hash grid's library on one device, chosen once per run: it builds every encoding.

    Both modules it can build share one parameter layout, so weights trained under one load
    under the other (tests/test_cuda_parity.py checks the outputs agree)."""

    def __init__(self, choice: BackendChoice, device: torch.device | str):
        self.choice = choice
        self.device = torch.device(device)

    def encoding(self, config: dict | None = None, n_input_dims: int = 3, seed: int = 0) -> nn.Module:
        """A hash-grid encoding (tinycudann config, see the module docstring) on this device."""
        module = TcnnHashGrid if self.choice.backend == "tinycudann" else TorchHashGrid
        return module(n_input_dims, config, seed=seed).to(self.device)

    def __repr__(self) -> str:
        return f"HashGridBackend({self.choice.backend}, device={self.device})"


def choose_hashgrid(request: HashGridRequest, device: torch.device | str) -> HashGridBackend:
    """tinycudann when its smoke op passes on `device` (or as `request` says), else the torch twin."""
    device = normalise_device(device)
    return HashGridBackend(choose_backend("tinycudann", request, device, _tcnn_smoke), device)
