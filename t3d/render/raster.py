"""Differentiable triangle rasterization: nvdiffrast on CUDA, a pure-torch twin everywhere else.

One interface, mirroring nvdiffrast's documented calls (its licence is non-commercial, so the
torch twin below is written from the documented behaviour only, none of its source):

    raster        = choose_raster("auto", device)        # a RasterBackend, chosen once per device
    rast, rast_db = raster.rasterize(pos, tri, (H, W))   # pos [B,V,4] clip space, tri [F,3] int32
    out, _        = raster.interpolate(attr, rast, tri)  # attr [B,V,C], [1,V,C] or [V,C]
    color         = raster.texture(tex, uv, filter_mode="linear", boundary_mode="wrap")
    color         = raster.antialias(color, rast, pos, tri)

Conventions (nvdiffrast's, i.e. OpenGL's):
- `pos` is in clip space; x/w, y/w, z/w in [-1, 1] is the view frustum. Pixel (row j, column i)
  samples NDC ((i + 0.5) / W * 2 - 1, (j + 0.5) / H * 2 - 1): **row 0 is the bottom** of the image.
- `rast[..., 0:2]` are perspective-correct barycentrics (u, v): the first vertex of the triangle
  gets (1, 0), the second (0, 1), the third (0, 0). `rast[..., 2]` is z/w (the smaller wins the
  depth test; it carries no gradient, as documented for nvdiffrast); `rast[..., 3]` is the triangle
  index + 1, and 0 with all-zero channels where no triangle covers the pixel centre.
- No face culling: both windings rasterize. Triangles are clipped to the frustum per pixel (a pixel
  whose surface point is behind the camera or outside near/far is not drawn).
- Textures: tensor row 0 is t = 0, the **bottom** of the image; (s, t) = (0, 0) is the bottom-left
  corner; texel centres sit at ((i + 0.5) / Wt, (j + 0.5) / Ht). A PNG (row 0 at the top) must be
  flipped vertically to enter, and again to leave.

Backends: `choose_raster(request, device)` returns the RasterBackend for a device, `NvdiffrastRaster`
or the torch twin `TorchRaster`, and carries its BackendChoice (`.choice`). The choice goes through
`t3d.backends.choose_backend` (a real smoke op decides, never an import). Every function here that
rasterizes takes the backend as a required `raster` argument; a run gets it from `ctx.backends.raster`.

The torch twin:
- rasterize: a no-grad visibility pass (homogeneous 2D edge functions, per-triangle bounding boxes
  expanded into (triangle, pixel) pairs in bounded chunks, a z-buffer by scatter-min), then the
  perspective-correct barycentrics of the winning triangle are recomputed with autograd for the
  covered pixels only, so gradients reach `pos` through (u, v) exactly as an analytic formula.
  It returns rast_db = None (no image-space derivatives, hence no mipmapping).
- interpolate: gathers and blends with (u, v, 1-u-v); gradients reach `attr` and, through rast,
  `pos`. No attribute derivatives (second output None).
- texture: bilinear ('linear', also 'auto') or 'nearest'; boundary 'wrap', 'clamp' or 'zero';
  gradients reach `tex` and `uv`. Mipmap modes fall back to 'linear' (logged once).
- antialias: an analytic blend across silhouette edges between 4-neighbour pixels (its own
  simple design, documented at `antialias`), which gives position gradients from coverage like
  nvdiffrast's does; it differs from nvdiffrast's in detail (only 4-neighbour pairs, 1D coverage).
"""

from __future__ import annotations

import logging
import math
import sys
from abc import ABC, abstractmethod
from functools import cache

import numpy as np
import torch

from t3d.backends import BackendChoice, RasterRequest, choose_backend, normalise_device

log = logging.getLogger(__name__)

__all__ = [
    "RasterBackend",
    "TorchRaster",
    "NvdiffrastRaster",
    "choose_raster",
    "vertex_normals",
    "mvp_matrices",
    "render_mesh",
]


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------


class RasterBackend(ABC):
    """nvdiffrast's four calls on one device, as chosen for a run. `choice` says which and why."""

    def __init__(self, device: torch.device | str, choice: BackendChoice):
        self.device = torch.device(device)
        self.choice = choice

    @abstractmethod
    def rasterize(self, pos, tri, resolution, ranges=None, grad_db: bool = True):
        """Rasterize clip-space triangles: (rast [B,H,W,4] = (u, v, z/w, tri_id+1), rast_db or None).

        `resolution` is (height, width). Output row 0 is the BOTTOM of the image (OpenGL)."""

    @abstractmethod
    def interpolate(self, attr, rast, tri, rast_db=None, diff_attrs=None):
        """Interpolate vertex attributes [B,V,C] / [1,V,C] / [V,C] at each pixel: (out [B,H,W,C], da).

        out is zero where no triangle was rasterized."""

    @abstractmethod
    def texture(
        self,
        tex,
        uv,
        uv_da=None,
        mip_level_bias=None,
        mip=None,
        filter_mode="auto",
        boundary_mode="wrap",
        max_mip_level=None,
    ):
        """Sample tex [B|1,Ht,Wt,C] at uv [B,H,W,2] in [0,1] (origin bottom-left, row 0 = t=0)."""

    @abstractmethod
    def antialias(self, color, rast, pos, tri, topology_hash=None, pos_gradient_boost: float = 1.0):
        """Silhouette antialiasing: blends colours across silhouette edges by their analytic
        coverage, which gives gradients w.r.t. `pos` (and `color`) from occlusion and coverage."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device})"


class TorchRaster(RasterBackend):
    """The pure-torch twin: works on any device. rast_db and da are None; no range mode, no mipmaps."""

    def __init__(
        self,
        device: torch.device | str = "cpu",
        choice: BackendChoice | None = None,
        max_pairs: int = 1 << 20,
    ):
        super().__init__(device, choice or BackendChoice("nvdiffrast", "torch", "requested"))
        self.max_pairs = int(max_pairs)  # (triangle, pixel) candidates tested per chunk

    def rasterize(self, pos, tri, resolution, ranges=None, grad_db: bool = True):
        if ranges is not None:
            raise NotImplementedError("the torch rasterizer supports instanced mode only (pos [B,V,4], no ranges)")
        return _torch_rasterize(pos, tri, resolution, self.max_pairs), None

    def interpolate(self, attr, rast, tri, rast_db=None, diff_attrs=None):
        return _torch_interpolate(attr, rast, tri), None

    def texture(
        self,
        tex,
        uv,
        uv_da=None,
        mip_level_bias=None,
        mip=None,
        filter_mode="auto",
        boundary_mode="wrap",
        max_mip_level=None,
    ):
        return _torch_texture(tex, uv, filter_mode, boundary_mode)

    def antialias(self, color, rast, pos, tri, topology_hash=None, pos_gradient_boost: float = 1.0):
        """The twin's own design (nvdiffrast's purpose): for each pair of 4-neighbour pixels P, Q where
        P's triangle A lies in front of what Q shows (nothing, or a farther surface), follow the
        segment P->Q from A across the mesh's non-silhouette edges (up to 8 triangles: rim triangles
        are often too thin for the pixel grid) to the first silhouette edge it crosses (a border, or
        a fold between a front- and a back-facing triangle); if that is at t in [0, 1) along the
        segment, then Q takes (t - 0.5) of P's colour when t > 0.5, and P takes (0.5 - t) of Q's
        colour when t < 0.5 (1D coverage of each pixel), weighted by the squared component of the
        edge's screen normal along the pair's axis (horizontal and vertical pairs share each edge).
        Deltas add up per pixel, normalised when their weights exceed 1. Interior edges are left
        alone. `topology_hash` is accepted for signature compatibility and ignored;
        `pos_gradient_boost` scales the position gradients.
        """
        return _torch_antialias(color, rast, pos, tri, pos_gradient_boost)


def import_nvdiffrast():
    """`nvdiffrast.torch` with its CUDA plugin built (torch JIT, first use) and importable.

    nvdiffrast 0.3.3 builds its plugin with torch.utils.cpp_extension.load, drops the module that
    returns and re-imports it by name; torch >= 2.11 (seen with 2.11.0+cu130) neither registers
    that module nor puts its build folder on sys.path, so every first use failed with
    ModuleNotFoundError: nvdiffrast_plugin_... Here the built module is registered under its name.
    """
    import nvdiffrast.torch as dr

    ops = sys.modules.get("nvdiffrast.torch.ops")
    get_plugin = getattr(ops, "_get_plugin", None)
    if get_plugin is None:
        return dr
    try:
        get_plugin()
    except ModuleNotFoundError as exc:
        name = getattr(exc, "name", None) or ""
        if not name.startswith("nvdiffrast_plugin"):
            raise
        from torch.utils import cpp_extension

        build_dir = cpp_extension._get_build_directory(name, False)
        sys.modules[name] = cpp_extension._import_module_from_library(name, build_dir, True)
        get_plugin()
    return dr


class NvdiffrastRaster(RasterBackend):
    """nvdiffrast's RasterizeCudaContext behind the same calls (inputs made float32/int32 and contiguous)."""

    def __init__(self, device: torch.device | str, choice: BackendChoice):
        super().__init__(device, choice)
        self.dr = import_nvdiffrast()
        self.raw = self.dr.RasterizeCudaContext(device=self.device)

    def rasterize(self, pos, tri, resolution, ranges=None, grad_db: bool = True):
        pos = pos.float().contiguous()
        tri = tri.to(torch.int32).contiguous()
        return self.dr.rasterize(self.raw, pos, tri, tuple(resolution), ranges=ranges, grad_db=grad_db)

    def interpolate(self, attr, rast, tri, rast_db=None, diff_attrs=None):
        return self.dr.interpolate(
            attr.float().contiguous(), rast, tri.to(torch.int32).contiguous(), rast_db=rast_db, diff_attrs=diff_attrs
        )

    def texture(
        self,
        tex,
        uv,
        uv_da=None,
        mip_level_bias=None,
        mip=None,
        filter_mode="auto",
        boundary_mode="wrap",
        max_mip_level=None,
    ):
        return self.dr.texture(
            tex.float().contiguous(),
            uv.float().contiguous(),
            uv_da=uv_da,
            mip_level_bias=mip_level_bias,
            mip=mip,
            filter_mode=filter_mode,
            boundary_mode=boundary_mode,
            max_mip_level=max_mip_level,
        )

    def antialias(self, color, rast, pos, tri, topology_hash=None, pos_gradient_boost: float = 1.0):
        return self.dr.antialias(
            color.contiguous(),
            rast,
            pos.float().contiguous(),
            tri.to(torch.int32).contiguous(),
            topology_hash=topology_hash,
            pos_gradient_boost=pos_gradient_boost,
        )


def _nvdiffrast_smoke(device: torch.device) -> None:
    """Rasterize, interpolate and backprop one triangle with nvdiffrast, and check the result."""
    dr = import_nvdiffrast()

    ctx = dr.RasterizeCudaContext(device=device)
    pos = torch.tensor(
        [[[-0.8, -0.8, 0.0, 1.0], [0.8, -0.8, 0.0, 1.0], [0.0, 0.8, 0.0, 1.0]]], device=device, requires_grad=True
    )
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32, device=device)
    rast, _ = dr.rasterize(ctx, pos, tri, (16, 16))
    out, _ = dr.interpolate(pos[..., :2].contiguous(), rast, tri)
    out.sum().backward()
    torch.cuda.synchronize(device)
    if int(rast[0, 8, 8, 3].item()) != 1 or pos.grad is None:
        raise RuntimeError("nvdiffrast smoke op produced an unexpected result")


def choose_raster(request: RasterRequest, device: torch.device | str) -> RasterBackend:
    """The rasterizer for `device`: nvdiffrast when its smoke op passes (or as `request` says), else
    the torch twin. One object per (request, device) per process: nvdiffrast's context is made once."""
    return _raster_for(request, str(normalise_device(device)))


@cache
def _raster_for(request: str, device: str) -> RasterBackend:
    choice = choose_backend("nvdiffrast", request, device, _nvdiffrast_smoke)
    if choice.backend == "nvdiffrast":
        return NvdiffrastRaster(device, choice)
    return TorchRaster(device, choice)


# ----------------------------------------------------------------------------------------------
# rasterize
# ----------------------------------------------------------------------------------------------


def _edge_coefficients(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Homogeneous 2D edge functions of triangles p [..., 3, 3] = per-vertex (x, y, w).

    Returns c [..., 3, 3] with E_k(qx, qy) = c[k] . (qx, qy, 1) the edge opposite vertex k, and
    D [...] = det(p0, p1, p2). At an NDC point q the perspective-correct barycentrics are
    b_k = E_k / sum(E); the surface point is in front of the camera iff sum(E) has the sign of D,
    so a pixel is covered iff every E_k has the sign of D. A shared edge gives exactly negated
    E in its two triangles (the cross product of swapped operands), hence no cracks.
    """
    c = torch.linalg.cross(p[..., [1, 2, 0], :], p[..., [2, 0, 1], :], dim=-1)
    d = (c[..., 0, :] * p[..., 0, :]).sum(-1)
    return c, d


def _pixel_ndc(idx: torch.Tensor, n: int, dtype) -> torch.Tensor:
    return (idx.to(dtype) + 0.5) * (2.0 / n) - 1.0


@torch.no_grad()
def _visibility(pos: torch.Tensor, tri: torch.Tensor, height: int, width: int, max_pairs: int) -> torch.Tensor:
    """Triangle id + 1 per pixel [B*H*W] (0 = empty), by a z-buffer over (triangle, pixel) pairs."""
    bsz = pos.shape[0]
    nf = tri.shape[0]
    device = pos.device
    dtype = pos.dtype
    # Per vertex first (a mesh has ~half as many vertices as faces, and each face has three):
    # Cohen-Sutherland outcodes, bit k set when the vertex is outside clip plane k; a face whose
    # three vertices share a bit lies wholly outside that plane.
    x, y, z, w = pos.unbind(-1)  # [B,V]
    outcode = (w <= 0).to(torch.uint8)
    for bit, outside in enumerate((x > w, x < -w, y > w, y < -w, z > w, z < -w), start=1):
        outcode |= outside.to(torch.uint8) << bit
    # Pixel bounding boxes: the pixel centres inside the projected vertices' box when every vertex
    # is in front of the camera (the projected triangle is then the hull of its vertices), the
    # whole screen otherwise (the edge functions do the real clipping).
    ws = torch.where(w > 0, w, torch.ones_like(w))
    big = float(max(height, width) + 2)
    sx = (((x / ws) + 1.0) * (width / 2.0) - 0.5).clamp(-big, big)  # pixel-index units
    sy = (((y / ws) + 1.0) * (height / 2.0) - 0.5).clamp(-big, big)
    corner = tri.t().reshape(-1)  # [3F]: every face's first corners, then its second, then third

    def per_corner(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return values.index_select(1, corner).view(bsz, 3, nf).unbind(1)  # three [B,F]

    o0, o1, o2 = per_corner(outcode)
    reject = (o0 & o1 & o2) != 0
    front = ((o0 | o1 | o2) & 1) == 0
    x0, x1, x2 = per_corner(sx)
    y0, y1, y2 = per_corner(sy)
    eps = 1e-3
    zero, full_w, full_h = torch.zeros_like(x0), torch.full_like(x0, width - 1), torch.full_like(x0, height - 1)
    i0 = torch.where(front, (torch.minimum(torch.minimum(x0, x1), x2) - eps).ceil(), zero).clamp_min(0).long()
    i1 = torch.where(front, (torch.maximum(torch.maximum(x0, x1), x2) + eps).floor(), full_w).clamp_max(width - 1)
    j0 = torch.where(front, (torch.minimum(torch.minimum(y0, y1), y2) - eps).ceil(), zero).clamp_min(0).long()
    j1 = torch.where(front, (torch.maximum(torch.maximum(y0, y1), y2) + eps).floor(), full_h).clamp_max(height - 1)
    bw = (i1.long() - i0 + 1).clamp_min(0)
    bh = (j1.long() - j0 + 1).clamp_min(0)
    counts = (bw * bh).masked_fill(reject, 0).reshape(-1)  # [B*F]
    # edge functions only for faces whose box holds a pixel centre (most faces of a fine mesh
    # seen at a few dozen pixels hold none); a degenerate one (D = 0) covers nothing
    keep = counts.nonzero().squeeze(1)
    v = pos.reshape(-1, 4).index_select(0, ((keep // nf) * pos.shape[1])[:, None].add(tri[keep % nf]).reshape(-1))
    v = v.view(-1, 3, 4)  # [K,3,4] the kept faces' vertices
    c, d = _edge_coefficients(v[..., [0, 1, 3]])
    nondegenerate = (d != 0).nonzero().squeeze(1)
    keep, c, d, v = keep[nondegenerate], c[nondegenerate], d[nondegenerate], v[nondegenerate]
    z, w = v[..., 2], v[..., 3]
    i0 = i0.reshape(-1)
    j0 = j0.reshape(-1)
    bw = bw.reshape(-1)
    npix = bsz * height * width
    zbuf = torch.full((npix,), math.inf, dtype=dtype, device=device)
    idbuf = torch.zeros(npix, dtype=torch.long, device=device)
    if keep.numel() == 0:
        return idbuf
    counts_k = counts[keep]
    # everything a pair needs about its triangle, packed for one gather per chunk:
    # edge coefficients (9), z (3), w (3), sign of D (1)
    packed = torch.cat([c.reshape(-1, 9), z, w, d.reshape(-1, 1).sign()], -1)
    i0_k, j0_k, bw_k = i0[keep], j0[keep], bw[keep]
    base_k = (keep // nf) * (height * width)
    id_k = keep % nf + 1

    # chunks of consecutive triangles with at most ~max_pairs candidate pixels each
    cum = counts_k.cumsum(0)
    bounds = [0]
    while bounds[-1] < keep.numel():
        base = int(cum[bounds[-1] - 1]) if bounds[-1] > 0 else 0
        nxt = int(torch.searchsorted(cum, torch.tensor([base + max_pairs], device=device), right=True)[0])
        bounds.append(max(nxt, bounds[-1] + 1))
    for a, bnd in zip(bounds[:-1], bounds[1:], strict=True):
        n = counts_k[a:bnd]
        rep = torch.repeat_interleave(torch.arange(bnd - a, device=device), n)
        first = torch.cumsum(n, 0) - n
        local = torch.arange(rep.numel(), device=device) - first[rep]
        t = rep + a
        bwt = bw_k[t]
        px = i0_k[t] + local % bwt
        py = j0_k[t] + local // bwt
        qx = _pixel_ndc(px, width, dtype)[:, None]
        qy = _pixel_ndc(py, height, dtype)[:, None]
        pk = packed[t]  # [N,16]
        e = pk[:, 0:9:3] * qx + pk[:, 1:9:3] * qy + pk[:, 2:9:3]  # [N,3] edge functions
        inside = ((e * pk[:, 15:16]) >= 0).all(-1)
        zz = (e * pk[:, 9:12]).sum(-1)
        ww = (e * pk[:, 12:15]).sum(-1)
        inside &= ww != 0
        depth = zz / torch.where(ww != 0, ww, torch.ones_like(ww))
        inside &= (depth >= -1) & (depth <= 1)
        sel = inside.nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        pix = base_k[t[sel]] + py[sel] * width + px[sel]
        depth = depth[sel]
        ids = id_k[t[sel]]
        newz = zbuf.scatter_reduce(0, pix, depth, reduce="amin", include_self=True)
        win = depth == newz[pix]
        cand = torch.full_like(idbuf, nf + 1).scatter_reduce(0, pix[win], ids[win], reduce="amin", include_self=True)
        keep_old = (zbuf == newz) & (idbuf > 0)
        idbuf = torch.where(keep_old, torch.minimum(idbuf, cand), torch.where(cand <= nf, cand, idbuf))
        zbuf = newz
    return idbuf


def _torch_rasterize(pos: torch.Tensor, tri: torch.Tensor, resolution, max_pairs: int) -> torch.Tensor:
    if pos.dim() == 2:
        pos = pos[None]  # a single instance (range mode with one full range)
    if pos.dim() != 3 or pos.shape[-1] != 4:
        raise ValueError(f"pos must be [B,V,4] clip-space positions, got {tuple(pos.shape)}")
    if tri.dim() != 2 or tri.shape[-1] != 3:
        raise ValueError(f"tri must be [F,3], got {tuple(tri.shape)}")
    height, width = (
        (int(resolution), int(resolution)) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))
    )
    tri = tri.to(device=pos.device, dtype=torch.long)
    bsz = pos.shape[0]
    ids = _visibility(pos.detach(), tri, height, width, max_pairs)  # [B*H*W]
    rast = torch.zeros(bsz * height * width, 4, dtype=pos.dtype, device=pos.device)
    pix = ids.nonzero().squeeze(1)
    if pix.numel() == 0:
        return rast.reshape(bsz, height, width, 4)
    t = ids[pix] - 1
    b = pix // (height * width)
    rem = pix % (height * width)
    qy = _pixel_ndc(rem // width, height, pos.dtype)
    qx = _pixel_ndc(rem % width, width, pos.dtype)
    vtx = pos[b[:, None], tri[t]]  # [N,3,4], differentiable
    c, _ = _edge_coefficients(vtx[..., [0, 1, 3]])
    e = c[..., 0] * qx[:, None] + c[..., 1] * qy[:, None] + c[..., 2]
    bary = e / e.sum(-1, keepdim=True)
    with torch.no_grad():
        zw = (bary * vtx[..., 2]).sum(-1) / (bary * vtx[..., 3]).sum(-1)
    vals = torch.stack([bary[:, 0], bary[:, 1], zw, ids[pix].to(pos.dtype)], -1)
    rast = rast.index_put((pix,), vals)
    return rast.reshape(bsz, height, width, 4)


# ----------------------------------------------------------------------------------------------
# interpolate
# ----------------------------------------------------------------------------------------------


def _torch_interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """TorchRaster.interpolate: a gather and a (u, v, 1-u-v) blend; gradients reach attr and rast."""
    bsz, height, width, _ = rast.shape
    tri = tri.to(device=rast.device, dtype=torch.long)
    tid = rast[..., 3].detach().long()  # [B,H,W]
    valid = tid > 0
    vidx = tri[(tid - 1).clamp(min=0)]  # [B,H,W,3]
    if attr.dim() == 2:
        vals = attr[vidx]  # [B,H,W,3,C]
    elif attr.dim() == 3:
        if attr.shape[0] == 1:
            vals = attr[0][vidx]
        elif attr.shape[0] == bsz:
            bidx = torch.arange(bsz, device=rast.device).view(bsz, 1, 1, 1)
            vals = attr[bidx, vidx]
        else:
            raise ValueError(f"attr minibatch {attr.shape[0]} does not match rast minibatch {bsz}")
    else:
        raise ValueError(f"attr must be [V,C] or [B,V,C], got {tuple(attr.shape)}")
    u = rast[..., 0:1]
    v = rast[..., 1:2]
    weights = torch.cat([u, v, 1.0 - u - v], -1) * valid[..., None].to(rast.dtype)  # [B,H,W,3]
    return (weights[..., None] * vals).sum(-2)


# ----------------------------------------------------------------------------------------------
# texture
# ----------------------------------------------------------------------------------------------

_warned_mip = False


def _texel_index(i: torch.Tensor, n: int, boundary_mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if boundary_mode == "wrap":
        return torch.remainder(i, n), None
    if boundary_mode == "clamp":
        return i.clamp(0, n - 1), None
    if boundary_mode == "zero":
        ok = (i >= 0) & (i < n)
        return i.clamp(0, n - 1), ok
    raise ValueError(f"boundary_mode {boundary_mode!r}: the torch twin supports 'wrap', 'clamp' and 'zero'")


def _torch_texture(tex: torch.Tensor, uv: torch.Tensor, filter_mode: str, boundary_mode: str) -> torch.Tensor:
    """TorchRaster.texture: bilinear or nearest lookups; gradients reach tex and uv."""
    global _warned_mip
    if tex.dim() != 4 or uv.dim() != 4 or uv.shape[-1] != 2:
        raise ValueError(f"tex must be [B,Ht,Wt,C] and uv [B,H,W,2]; got {tuple(tex.shape)}, {tuple(uv.shape)}")
    if filter_mode == "auto":
        filter_mode = "linear"
    if filter_mode.startswith("linear-mipmap"):
        if not _warned_mip:
            log.warning("torch texture twin has no mipmaps: %s falls back to 'linear'", filter_mode)
            _warned_mip = True
        filter_mode = "linear"
    bsz, height, width, _ = uv.shape
    tb, th, tw, ch = tex.shape
    if tb not in (1, bsz):
        raise ValueError(f"tex minibatch {tb} must be 1 or match uv's {bsz}")
    flat = tex.reshape(tb, th * tw, ch)
    if tb == 1 and bsz > 1:
        flat = flat.expand(bsz, -1, -1)
    x = uv[..., 0].reshape(bsz, -1) * tw - 0.5
    y = uv[..., 1].reshape(bsz, -1) * th - 0.5

    def fetch(ix, iy):
        ix, okx = _texel_index(ix, tw, boundary_mode)
        iy, oky = _texel_index(iy, th, boundary_mode)
        idx = (iy * tw + ix)[..., None].expand(-1, -1, ch)
        val = torch.gather(flat, 1, idx)
        if okx is not None:
            val = val * (okx & oky)[..., None].to(val.dtype)
        return val

    if filter_mode == "nearest":
        out = fetch(torch.floor(x + 0.5).long(), torch.floor(y + 0.5).long())
    elif filter_mode == "linear":
        x0 = torch.floor(x.detach())
        y0 = torch.floor(y.detach())
        fx = (x - x0)[..., None]
        fy = (y - y0)[..., None]
        ix = x0.long()
        iy = y0.long()
        out = (
            fetch(ix, iy) * (1 - fx) * (1 - fy)
            + fetch(ix + 1, iy) * fx * (1 - fy)
            + fetch(ix, iy + 1) * (1 - fx) * fy
            + fetch(ix + 1, iy + 1) * fx * fy
        )
    else:
        raise ValueError(f"filter_mode {filter_mode!r} not supported")
    return out.reshape(bsz, height, width, ch)


# ----------------------------------------------------------------------------------------------
# antialias
# ----------------------------------------------------------------------------------------------


def _facing_determinant(pos: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """[B,F] D = p0 . (p1 x p2) of each triangle's clip (x, y, w): _edge_coefficients' determinant
    without its three edge functions (the silhouette test needs only its sign)."""
    pv = pos[..., [0, 1, 3]]
    p0, p1, p2 = (pv.index_select(1, tri[:, k]) for k in range(3))
    return (torch.linalg.cross(p1, p2, dim=-1) * p0).sum(-1)


def _silhouette_edges(pos: torch.Tensor, tri: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B,F,3] bool: is the edge opposite vertex k of triangle f a silhouette in view b?,
    [F,3] the triangle across that edge (meaningless for border edges)).

    Silhouette (as nvdiffrast's documentation defines it): an edge with one triangle (a border),
    or between two triangles of which one faces the camera and the other away (a fold). Edges with
    more than two triangles count as silhouettes.
    """
    nv = pos.shape[1]
    nf = tri.shape[0]
    facing = _facing_determinant(pos, tri) > 0  # [B,F]
    edges = torch.stack([tri[:, [1, 2]], tri[:, [2, 0]], tri[:, [0, 1]]], 1)  # [F,3,2]
    lo, hi = edges.unbind(-1)
    key = (torch.minimum(lo, hi) * nv + torch.maximum(lo, hi)).reshape(-1)  # amin(-1) on int64 is ~100x slower
    # one stable sort groups each edge's faces (torch.unique plus an argsort of its inverse sorted twice)
    sorted_key, order = torch.sort(key, stable=True)
    starts = torch.ones_like(sorted_key, dtype=torch.bool)
    starts[1:] = sorted_key[1:] != sorted_key[:-1]
    group = torch.cumsum(starts, 0) - 1
    inv = torch.empty_like(group).index_copy_(0, order, group)
    counts = torch.bincount(group)
    first = torch.cumsum(counts, 0) - counts
    face_of = order // 3  # faces of each unique edge, contiguous
    fid = torch.arange(nf * 3, device=tri.device) // 3
    slot0 = face_of[first[inv]]
    slot1 = face_of[(first[inv] + 1).clamp_max(nf * 3 - 1)]
    other = torch.where(slot0 == fid, slot1, slot0)
    manifold = counts[inv] == 2
    fold = facing[:, fid] != facing[:, other]
    return (~manifold[None] | fold).reshape(-1, nf, 3), other.reshape(nf, 3)


_AA_MAX_WALK = 8  # triangles followed along a pixel pair's segment


def _torch_antialias(
    color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor, pos_gradient_boost: float
) -> torch.Tensor:
    """Analytic silhouette blend between 4-neighbour pixels (the twin's own design, see antialias)."""
    bsz, height, width, ch = color.shape
    if pos.dim() == 2:
        pos = pos[None]
    if pos.shape[0] == 1 and bsz > 1:
        pos = pos.expand(bsz, -1, -1)
    tri = tri.to(device=color.device, dtype=torch.long)
    ids = rast[..., 3].detach().long()
    depth = rast[..., 2].detach()
    pid = torch.arange(bsz * height * width, device=color.device).view(bsz, height, width)
    sil, across = _silhouette_edges(pos.detach(), tri)  # [B,F,3], [F,3]
    # only triangles within _AA_MAX_WALK steps of a silhouette edge can start a useful walk
    near = sil[..., 0] | sil[..., 1] | sil[..., 2]
    across_flat = across.reshape(-1)
    for _ in range(_AA_MAX_WALK - 1):
        n0, n1, n2 = near.index_select(1, across_flat).view(bsz, -1, 3).unbind(-1)
        near = near | n0 | n1 | n2
    near_px = near.gather(1, (ids - 1).clamp_min(0).reshape(bsz, -1)).view(bsz, height, width) & (ids > 0)
    # neighbour pairs (P, Q) where P shows triangle A in front of what Q shows (nothing, or a
    # farther surface): left/right then bottom/top, each in both roles
    p_list, q_list, h_list = [], [], []
    for horizontal, (lo, hi) in (
        (True, (np.s_[:, :, :-1], np.s_[:, :, 1:])),
        (False, (np.s_[:, :-1, :], np.s_[:, 1:, :])),
    ):
        id_lo, id_hi, d_lo, d_hi = ids[lo], ids[hi], depth[lo], depth[hi]
        differ = id_lo != id_hi
        for id_q, d_p, d_q, near_p, pa, pb in (
            (id_hi, d_lo, d_hi, near_px[lo], pid[lo], pid[hi]),
            (id_lo, d_hi, d_lo, near_px[hi], pid[hi], pid[lo]),
        ):
            m = differ & near_p & ((id_q == 0) | (d_q > d_p))
            p_list.append(pa[m])
            q_list.append(pb[m])
            h_list.append(torch.full((int(m.sum()),), horizontal, dtype=torch.bool, device=color.device))
    p_idx, q_idx, horiz = torch.cat(p_list), torch.cat(q_list), torch.cat(h_list)
    ids = ids.reshape(-1)
    if p_idx.numel() == 0:
        return color
    t_a = ids[p_idx] - 1
    b = p_idx // (height * width)

    def ndc(i):
        rem = i % (height * width)
        return _pixel_ndc(rem % width, width, pos.dtype)[:, None], _pixel_ndc(rem // width, height, pos.dtype)[:, None]

    px, py = ndc(p_idx)
    qx, qy = ndc(q_idx)
    # Walk along P->Q from A across non-silhouette edges (thin rim triangles are often missed by
    # the pixel grid) until a silhouette edge is crossed before Q's centre, for at most _AA_MAX_WALK triangles.
    # Inside a triangle the segment's edge functions are linear in t: E(t) = e_p + t (e_q - e_p).
    idx = torch.arange(p_idx.numel(), device=color.device)
    cur = t_a
    pos_flat, n_verts = pos.reshape(-1, 4), pos.shape[1]  # gathered rows stay differentiable
    found_idx, found_t, found_edge = [], [], []
    for _ in range(_AA_MAX_WALK):
        vtx = pos_flat.index_select(0, (b[idx] * n_verts)[:, None].add(tri[cur]).reshape(-1)).view(-1, 3, 4)
        c, d = _edge_coefficients(vtx[..., [0, 1, 3]])
        sgn = d.sign()[:, None]
        e_p = (c[..., 0] * px[idx] + c[..., 1] * py[idx] + c[..., 2]) * sgn
        e_q = (c[..., 0] * qx[idx] + c[..., 1] * qy[idx] + c[..., 2]) * sgn
        falling = e_q < e_p  # the edges the segment can leave through
        denom = torch.where(falling, e_p - e_q, torch.ones_like(e_q))
        t = torch.where(falling, e_p / denom, torch.full_like(e_q, math.inf))
        t_out, k = t.min(-1)
        leaves = t_out < 1.0
        is_sil = sil[b[idx], cur, k]
        hit = leaves & is_sil
        found_idx.append(idx[hit])
        found_t.append(t_out[hit])
        found_edge.append(c.detach()[hit].gather(1, k[hit][:, None, None].expand(-1, 1, 3))[:, 0])
        walk = leaves & ~is_sil
        idx, cur = idx[walk], across[cur[walk], k[walk]]
        if idx.numel() == 0:
            break
    sel = torch.cat(found_idx)
    if sel.numel() == 0:
        return color
    t_min = torch.cat(found_t).clamp(0.0, 1.0)
    ce = torch.cat(found_edge)  # the crossed silhouette edge's (a, b, c)
    p_idx, q_idx, horiz = p_idx[sel], q_idx[sel], horiz[sel]
    # Each edge is met by horizontal and by vertical pairs; weight them by the squared components
    # of the edge's screen-space unit normal (they sum to 1), or coverage would count twice.
    nx2 = (ce[:, 0] / width) ** 2
    ny2 = (ce[:, 1] / height) ** 2
    share = torch.where(horiz, nx2, ny2) / (nx2 + ny2).clamp_min(1e-30)
    if pos_gradient_boost != 1.0:
        t_min = t_min.detach() + pos_gradient_boost * (t_min - t_min.detach())
    # the edge at t along P->Q (pixel centres at 0 and 1, their shared border at 0.5): A covers
    # (t - 0.5) of Q's pixel when t > 0.5, and leaves (0.5 - t) of P's pixel to Q when t < 0.5
    w_q = (t_min - 0.5).clamp_min(0.0) * share
    w_p = (0.5 - t_min).clamp_min(0.0) * share
    flat = color.reshape(-1, ch)
    c_p, c_q = flat[p_idx], flat[q_idx]
    n_pix = flat.shape[0]
    delta = (
        torch.zeros_like(flat)
        .index_add(0, q_idx, w_q[:, None] * (c_p - c_q))
        .index_add(0, p_idx, w_p[:, None] * (c_q - c_p))
    )
    weight = (
        torch.zeros(n_pix, dtype=flat.dtype, device=flat.device)
        .index_add(0, q_idx, w_q.detach())
        .index_add(0, p_idx, w_p.detach())
    )
    delta = delta / weight.clamp_min(1.0)[:, None]  # a pixel never moves past its neighbours' colours
    return (flat + delta).reshape(bsz, height, width, ch)


# ----------------------------------------------------------------------------------------------
# Mesh rendering with t3d cameras
# ----------------------------------------------------------------------------------------------


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals [V,3] (differentiable)."""
    faces = faces.long()
    v0, v1, v2 = (verts.index_select(0, faces[:, k]) for k in range(3))
    fn = torch.linalg.cross(v1 - v0, v2 - v0, dim=-1)  # length = 2 * area
    vn = torch.zeros_like(verts).index_add(0, faces.reshape(-1), fn.repeat_interleave(3, dim=0))
    return vn / vn.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def mvp_matrices(cameras, near: float = 0.1, far: float = 10.0, aspect: float = 1.0) -> torch.Tensor:
    """World-to-clip matrices [B,4,4] for t3d cameras (OpenGL projection, c2w inverted)."""
    from t3d.render.cameras import projection_matrix

    c2w = cameras.c2w.float()
    proj = projection_matrix(cameras.fov_deg, near, far, aspect).to(c2w.device)
    return proj[None] @ torch.linalg.inv(c2w)


def render_mesh(
    verts: torch.Tensor,
    faces: torch.Tensor,
    cameras,
    size: int | tuple[int, int],
    *,
    raster: RasterBackend,
    near: float = 0.1,
    far: float = 10.0,
    uvs: torch.Tensor | None = None,
    tex: torch.Tensor | None = None,
    vertex_colors: torch.Tensor | None = None,
    background: float | torch.Tensor | None = None,
    antialias_rgb: bool = True,
    boundary_mode: str = "clamp",
) -> dict[str, torch.Tensor]:
    """Render a mesh [V,3] / [F,3] from t3d cameras. Images come back with row 0 at the TOP.

    Returns a dict of [B,H,W,C] tensors: mask (1 covered / 0 empty), xyz (world position),
    normal (interpolated unit vertex normal, world), depth (camera-space distance along the view
    axis), and rgb when `uvs` [V,2] + `tex` ([Ht,Wt,C] or [1|B,Ht,Wt,C], GL orientation: row 0 is
    v = 0) or `vertex_colors` [V,C] are given; `background` fills empty rgb pixels. Also
    `rast` (the raw, row-0-at-bottom rasterizer output) for further nvdiffrast-style ops.
    Pixel (row j, column i) looks along t3d.render.cameras.camera_rays' ray (j, i).
    """
    if isinstance(size, int):
        height, width = size, size
    else:
        height, width = int(size[0]), int(size[1])
    device = verts.device
    faces_i = faces.to(device=device, dtype=torch.int32)
    mvp = mvp_matrices(cameras.to(device), near, far, aspect=width / height).to(verts.dtype)
    ones = torch.ones_like(verts[:, :1])
    vh = torch.cat([verts, ones], -1)  # [V,4]
    pos = torch.einsum("bij,vj->bvi", mvp, vh).contiguous()  # [B,V,4]
    rast, _ = raster.rasterize(pos, faces_i, (height, width))
    mask = (rast[..., 3:] > 0).to(verts.dtype)
    view = torch.linalg.inv(cameras.c2w.to(device).float()).to(verts.dtype)
    cam_z = -torch.einsum("bj,vj->bv", view[:, 2], vh)[..., None]  # [B,V,1] distance along view axis
    attrs = [
        verts[None].expand(pos.shape[0], -1, -1),
        vertex_normals(verts, faces_i)[None].expand(pos.shape[0], -1, -1),
        cam_z,
    ]
    sizes = [3, 3, 1]
    if uvs is not None:
        attrs.append(uvs.to(verts.dtype)[None].expand(pos.shape[0], -1, -1))
        sizes.append(2)
    if vertex_colors is not None:
        attrs.append(vertex_colors.to(verts.dtype)[None].expand(pos.shape[0], -1, -1))
        sizes.append(vertex_colors.shape[-1])
    packed, _ = raster.interpolate(torch.cat(attrs, -1).contiguous(), rast, faces_i)
    parts = list(torch.split(packed, sizes, dim=-1))
    out: dict[str, torch.Tensor] = {"mask": mask, "xyz": parts[0], "depth": parts[2]}
    n = parts[1]
    out["normal"] = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = 3
    rgb = None
    if uvs is not None:
        uv_img = parts[k]
        k += 1
        out["uv"] = uv_img
        if tex is not None:
            t = tex if tex.dim() == 4 else tex[None]
            rgb = (
                raster.texture(
                    t.to(verts.dtype), uv_img.contiguous(), filter_mode="linear", boundary_mode=boundary_mode
                )
                * mask
            )
    if vertex_colors is not None:
        rgb = parts[k] if rgb is None else rgb
    if rgb is not None:
        if background is not None:
            bg = torch.as_tensor(background, dtype=rgb.dtype, device=device)
            rgb = rgb * mask + bg * (1 - mask)
        if antialias_rgb:
            rgb = raster.antialias(rgb.contiguous(), rast, pos, faces_i)
        out["rgb"] = rgb
    flipped = {key: torch.flip(val, dims=[1]) for key, val in out.items()}
    flipped["rast"] = rast
    return flipped
