"""A fused C kernel for the torch hash grid on the CPU: features, table gradient, input gradient.

The pure-torch grid materialises 2^d corner indices and weights per level and point, gathers
each corner separately and scatters the gradient with bincount: about ten passes over [8,L,N]
tensors. This kernel does one pass per point and level with the same float32 arithmetic in the
same order (pos = x * scale + 0.5, floor, the N-linear weights multiplied dimension by dimension,
corners summed in the same order with a fused multiply-add, as torch's addcmul does on x86-64),
so its features equal the torch path's bit for bit there. The table gradient sums the same
float32 terms in float64 (bincount sums them in float32): equal up to the order of float32 sums.

It is plain C called through ctypes (no torch headers: it compiles in well under a second) and
is built on first use into T3D_KERNEL_CACHE (default ~/.cache/t3d/kernels), keyed by a hash of
the source, the compiler and its flags. Without a C compiler, or with T3D_NATIVE_KERNELS=0,
`load()` returns None and the torch path runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <string.h>

static const uint32_t PRIMES[3] = {1u, 2654435761u, 805459861u};

/* Table row (level offset included) and weight of every corner of one level at one point. */
static inline void corners(const float *xi, int d, float scale, int64_t size, int64_t offset,
                           const int64_t *stride, int dense, uint32_t mask, int64_t *row, float *w) {
    int64_t cell[3];
    float frac[3];
    for (int k = 0; k < d; k++) {
        float pos = xi[k] * scale;
        pos = pos + 0.5f;
        float c = floorf(pos);
        cell[k] = (int64_t)c;
        frac[k] = pos - c;
    }
    int nc = 1 << d;
    for (int k = 0; k < nc; k++) {
        float wk = (k & 1) ? frac[0] : 1.0f - frac[0];
        for (int j = 1; j < d; j++) wk = wk * (((k >> j) & 1) ? frac[j] : 1.0f - frac[j]);
        w[k] = wk;
        if (dense) {
            int64_t idx = 0;
            for (int j = 0; j < d; j++) idx += (cell[j] + ((k >> j) & 1)) * stride[j];
            if (idx >= size) idx -= size;
            row[k] = idx + offset;
        } else {
            uint32_t h = 0;
            for (int j = 0; j < d; j++) h ^= (uint32_t)(cell[j] + ((k >> j) & 1)) * PRIMES[j];
            row[k] = (int64_t)(h & mask) + offset;
        }
    }
}

/* out[n, L*F] (level-major) = sum over corners of weight * table[row]; x [n,d] in [0,1]. */
static inline void forward_body(const float *x, int64_t n, int d, int L, int F, const float *scale,
                const int64_t *size, const int64_t *offset, const int64_t *stride, int n_dense, uint32_t mask,
                const float *table, float *out) {
    int64_t row[8];
    float w[8];
    int nc = 1 << d;
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * d;
        float *oi = out + i * (int64_t)L * F;
        for (int l = 0; l < L; l++) {
            corners(xi, d, scale[l], size[l], offset[l], stride + l * d, l < n_dense, mask, row, w);
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int k = 0; k < nc; k++) {
                const float *t = table + row[k] * F;
                for (int f = 0; f < F; f++) {
                    acc[f] = fmaf(t[f], w[k], acc[f]);
                }
            }
            memcpy(oi + l * F, acc, sizeof(float) * F);
        }
    }
}

/* grad[rows*F] (float64, zeroed by the caller) += weight * grad_out for every corner; with grad_x
   (not NULL) also d(features . grad_out)/dx [n,d]: the weights' derivative, frac = x * scale + 0.5 - cell. */
static inline void backward_body(const float *x, int64_t n, int d, int L, int F, const float *scale,
                 const int64_t *size, const int64_t *offset, const int64_t *stride, int n_dense, uint32_t mask,
                 const float *grad_out, double *grad, const float *table, float *grad_x) {
    int64_t row[8];
    float w[8];
    int nc = 1 << d;
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * d;
        const float *gi = grad_out + i * (int64_t)L * F;
        float gx[3] = {0, 0, 0};
        for (int l = 0; l < L; l++) {
            corners(xi, d, scale[l], size[l], offset[l], stride + l * d, l < n_dense, mask, row, w);
            for (int k = 0; k < nc; k++) {
                double *g = grad + row[k] * F;
                for (int f = 0; f < F; f++) {
                    float c = w[k] * gi[l * F + f];
                    g[f] += (double)c;
                }
            }
            if (grad_x) {
                float frac[3];
                for (int j = 0; j < d; j++) {
                    float pos = xi[j] * scale[l];
                    pos = pos + 0.5f;
                    frac[j] = pos - floorf(pos);
                }
                for (int k = 0; k < nc; k++) {
                    const float *t = table + row[k] * F;
                    float dot = 0.0f;
                    for (int f = 0; f < F; f++) dot = dot + t[f] * gi[l * F + f];
                    for (int j = 0; j < d; j++) {
                        float other = 1.0f;  /* product of the other dimensions' weights */
                        for (int m = 0; m < d; m++)
                            if (m != j) other = other * (((k >> m) & 1) ? frac[m] : 1.0f - frac[m]);
                        float dw = ((k >> j) & 1) ? other : -other;
                        gx[j] = gx[j] + dot * dw * scale[l];
                    }
                }
            }
        }
        if (grad_x)
            for (int j = 0; j < d; j++) grad_x[i * d + j] = gx[j];
    }
}

/* Entry points: the common shapes get constant d and F, so the compiler unrolls the corner loops. */
void hg_forward(const float *x, int64_t n, int d, int L, int F, const float *scale, const int64_t *size,
                const int64_t *offset, const int64_t *stride, int n_dense, uint32_t mask,
                const float *table, float *out) {
    if (d == 3 && F == 2)
        forward_body(x, n, 3, L, 2, scale, size, offset, stride, n_dense, mask, table, out);
    else
        forward_body(x, n, d, L, F, scale, size, offset, stride, n_dense, mask, table, out);
}

void hg_backward(const float *x, int64_t n, int d, int L, int F, const float *scale, const int64_t *size,
                 const int64_t *offset, const int64_t *stride, int n_dense, uint32_t mask,
                 const float *grad_out, double *grad, const float *table, float *grad_x) {
    if (d == 3 && F == 2)
        backward_body(x, n, 3, L, 2, scale, size, offset, stride, n_dense, mask, grad_out, grad, table, grad_x);
    else
        backward_body(x, n, d, L, F, scale, size, offset, stride, n_dense, mask, grad_out, grad, table, grad_x);
}
"""

_ARGS = [
    ctypes.c_void_p,  # x
    ctypes.c_int64,  # n
    ctypes.c_int,  # d
    ctypes.c_int,  # L
    ctypes.c_int,  # F
    ctypes.c_void_p,  # scale
    ctypes.c_void_p,  # size
    ctypes.c_void_p,  # offset
    ctypes.c_void_p,  # stride
    ctypes.c_int,  # n_dense
    ctypes.c_uint32,  # mask
    ctypes.c_void_p,  # table / grad_out
    ctypes.c_void_p,  # out / grad
]

_lib: ctypes.CDLL | None = None
_tried = False


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_has_fma() -> bool:
    try:
        return " fma " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    # fmaf() is one instruction with -mfma, a library call without; same result either way
    flags = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math"] + (["-mfma"] if _cpu_has_fma() else [])
    tag = hashlib.sha256((_SOURCE + version + " ".join(flags)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("T3D_KERNEL_CACHE") or Path.home() / ".cache" / "t3d" / "kernels")
    target = cache / f"hashgrid-{tag}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src = Path(tmp) / "hashgrid.c"
        src.write_text(_SOURCE)
        so = Path(tmp) / "hashgrid.so"
        # -ffp-contract=off: no fused multiply-add but the explicit fmaf (torch's addcmul is one)
        cmd = [cc, *flags, str(src), "-o", str(so), "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(so, target)  # atomic: concurrent builders all end with a complete file
    return target


def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None (no compiler, a failed build, or T3D_NATIVE_KERNELS=0)."""
    global _lib, _tried
    if os.environ.get("T3D_NATIVE_KERNELS", "1") == "0":
        return None
    if _tried:
        return _lib
    _tried = True
    cc = _compiler()
    if cc is None:
        log.info("no C compiler: the hash grid runs its pure-torch path")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("hash grid C kernel unavailable (%s); using the pure-torch path", exc)
        return None
    lib.hg_forward.argtypes = _ARGS
    lib.hg_backward.argtypes = [*_ARGS, ctypes.c_void_p, ctypes.c_void_p]  # + table, grad_x (or NULL)
    for name in ("hg_forward", "hg_backward"):
        getattr(lib, name).restype = None
    _lib = lib
    return lib


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers
_malloc_tuned = False


def keep_freed_memory() -> bool:
    """Have glibc's malloc reuse freed memory instead of unmapping it (once per process; glibc only).

    glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and
    returns it on free, so each [N,64] activation of a 100k-sample field query (~34 MB) is
    page-faulted and zeroed again on every step: about 15 % of a coarse step on the CPU. With
    mmap off and no trimming, the heap keeps and reuses those pages (the process keeps its peak
    memory until it exits). T3D_NATIVE_KERNELS=0 leaves malloc alone. Returns whether it applied.
    """
    global _malloc_tuned
    if _malloc_tuned or os.environ.get("T3D_NATIVE_KERNELS", "1") == "0":
        return _malloc_tuned
    _malloc_tuned = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _malloc_tuned = bool(ok)
    return _malloc_tuned


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


class GridLayout:
    """The per-level constants the kernel reads, as contiguous CPU tensors."""

    def __init__(self, levels: list[dict], n_input_dims: int, n_features: int, log2_hashmap_size: int):
        self.d, self.L, self.F = n_input_dims, len(levels), n_features
        self.scale = torch.tensor([lv["scale"] for lv in levels], dtype=torch.float32)
        self.size = torch.tensor([lv["size"] for lv in levels], dtype=torch.int64)
        self.offset = torch.tensor([lv["offset"] for lv in levels], dtype=torch.int64)
        res = torch.tensor([lv["resolution"] for lv in levels], dtype=torch.int64)
        self.stride = (res[:, None] ** torch.arange(n_input_dims)[None]).contiguous()
        self.n_dense = sum(1 for lv in levels if lv["dense"])
        self.mask = (1 << log2_hashmap_size) - 1

    def args(self, x: torch.Tensor) -> tuple:
        return (
            _ptr(x),
            x.shape[0],
            self.d,
            self.L,
            self.F,
            _ptr(self.scale),
            _ptr(self.size),
            _ptr(self.offset),
            _ptr(self.stride),
            self.n_dense,
            self.mask,
        )


class NativeEncode(torch.autograd.Function):
    """features [N, L*F] of x [N,d] (float32, contiguous, in [0,1]) from `table`; gradients to both."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, x: torch.Tensor, layout: GridLayout, lib) -> torch.Tensor:
        out = torch.empty(x.shape[0], layout.L * layout.F, dtype=torch.float32)
        tab = table.detach().contiguous()
        xd = x.detach().contiguous()
        lib.hg_forward(*layout.args(xd), _ptr(tab), _ptr(out))
        ctx.save_for_backward(xd, tab)
        ctx.layout, ctx.lib = layout, lib
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, tab = ctx.saved_tensors
        layout = ctx.layout
        grad = torch.zeros(tab.shape[0], layout.F, dtype=torch.float64)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[1] else None
        g = grad_out.float().contiguous()
        ctx.lib.hg_backward(
            *layout.args(x), _ptr(g), _ptr(grad), _ptr(tab), _ptr(grad_x) if grad_x is not None else None
        )
        return grad.to(torch.float32) if ctx.needs_input_grad[0] else None, grad_x, None, None
