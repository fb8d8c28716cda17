"""Mesh extraction from a density field and the mesh clean-up around it.

extract_mesh: sample the density on a regular grid (chunked, no grad), pick the iso-level,
marching cubes (PyMCubes), keep the largest connected piece, decimate to a face budget, make the
faces point outward, map grid indices to world coordinates.

The automatic threshold (threshold=None) follows what the NeRF renders rather than a fixed
density number, because the density scale of a trained field varies by orders of magnitude
between runs, configs and activations (a fixed "10" is right for one and empty for another):

- march the sampled grid along axis-aligned rays entering from all six faces of the box, as a
  volume renderer would (optical depth by the trapezoid rule), and find on each ray the rendered
  (median) depth, where the opacity reaches 0.5; read the density there (linear interpolation);
- tau_depth = the median of those densities over every ray that reaches 0.5 opacity: the level
  whose iso-surface sits where the renderer puts the surface for rays meeting it head-on
  (grazing rays are a minority and do not move the median);
- cap it at half the median density of the interior (voxels behind the rendered depth from both
  sides on all three axes), so that a weak field, which needs a long path to become opaque, does
  not put the iso-level right at its interior density where noise would punch holes.

It is scale-free (scaling sigma scales tau, up to the change in opacity) and fails loudly on an
empty field. When no ray reaches 0.5 opacity (a faint field) it falls back to half the maximum
density, with a warning. Analytic check (tests): a sigmoid-edged sphere comes out within ~2% of its
radius for peak densities 20..200.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import mcubes
import numpy as np
import torch
import trimesh

log = logging.getLogger(__name__)

__all__ = [
    "extract_mesh",
    "sample_grid",
    "auto_threshold",
    "clean_mesh",
    "largest_component",
    "decimate",
    "orient_outward",
]

DensityFn = Callable[[torch.Tensor], torch.Tensor]


def _bounds(bound: float | Sequence) -> tuple[np.ndarray, np.ndarray]:
    if np.isscalar(bound):
        b = float(bound)
        if b <= 0:
            raise ValueError(f"bound must be positive, got {bound}")
        return np.full(3, -b), np.full(3, b)
    arr = np.asarray(bound, dtype=np.float64)
    if arr.shape != (2, 3) or not np.all(arr[1] > arr[0]):
        raise ValueError(f"bound must be a float or [[xmin,ymin,zmin],[xmax,ymax,zmax]], got {bound!r}")
    return arr[0], arr[1]


@torch.no_grad()
def sample_grid(
    density_fn: DensityFn,
    resolution: int,
    bound: float | Sequence = 1.0,
    chunk: int = 1 << 16,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Density on a resolution^3 grid spanning the bound box (corners included).

    Returns (sigma [R,R,R] float32 indexed [x,y,z], lo [3], spacing [3]).
    """
    lo, hi = _bounds(bound)
    res = int(resolution)
    if res < 2:
        raise ValueError("resolution must be >= 2")
    axes = [torch.linspace(float(lo[i]), float(hi[i]), res, device=device) for i in range(3)]
    sigma = np.empty((res, res, res), dtype=np.float32)
    yz = torch.stack(torch.meshgrid(axes[1], axes[2], indexing="ij"), -1).reshape(-1, 2)  # [R*R,2]
    slab = max(1, chunk // (res * res))  # x-slices per chunk
    for x0 in range(0, res, slab):
        xs = axes[0][x0 : x0 + slab]
        pts = torch.cat(
            [xs[:, None, None].expand(-1, yz.shape[0], 1), yz[None].expand(xs.shape[0], -1, -1)], -1
        ).reshape(-1, 3)
        out = []
        for s in range(0, pts.shape[0], chunk):
            d = density_fn(pts[s : s + chunk])
            out.append(d.reshape(-1).float())
        sigma[x0 : x0 + xs.shape[0]] = torch.cat(out).reshape(xs.shape[0], res, res).cpu().numpy()
    spacing = (hi - lo) / (res - 1)
    return sigma, lo, spacing


def _axis_last(a: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(a, axis, -1)


def auto_threshold(sigma: np.ndarray, spacing: Sequence[float] | float, interior_fraction: float = 0.5) -> float:
    """The density level at the rendered surface, capped below the interior's density.

    See the module docstring for the rule. `spacing` is the grid step (scalar or per axis).
    """
    sigma = np.nan_to_num(np.asarray(sigma, dtype=np.float32), nan=0.0, posinf=0.0).clip(min=0.0)
    smax = float(sigma.max())
    if smax <= 0.0:
        raise ValueError("the density field is empty (max density <= 0): nothing to extract")
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    ln2 = np.float32(np.log(2.0))
    levels = []
    interior = np.ones(sigma.shape, dtype=bool)
    for ax in range(3):
        s_f = _axis_last(sigma, ax)
        inside_ax = None
        for s in (s_f, s_f[..., ::-1]):
            seg = (s[..., 1:] + s[..., :-1]) * np.float32(0.5 * spacing[ax])  # trapezoid optical depth
            tau = np.concatenate([np.zeros_like(s[..., :1]), np.cumsum(seg, axis=-1)], -1)
            reached = tau >= ln2  # opacity >= 0.5 from this side
            hit = reached[..., -1]
            if hit.any():
                k = reached.argmax(-1)[hit]  # first sample past the median depth (>= 1)
                s_hit, t_hit = s[hit], tau[hit]
                rows = np.arange(k.shape[0])
                t0, t1 = t_hit[rows, k - 1], t_hit[rows, k]
                frac = (ln2 - t0) / np.maximum(t1 - t0, np.float32(1e-30))
                levels.append(s_hit[rows, k - 1] + frac * (s_hit[rows, k] - s_hit[rows, k - 1]))
            inside_ax = reached if inside_ax is None else (inside_ax & reached[..., ::-1])
        interior &= np.moveaxis(inside_ax, -1, ax)
    if not levels:
        log.warning("no ray reaches 0.5 opacity; using half the maximum density (%.4g) as the threshold", 0.5 * smax)
        return 0.5 * smax
    tau_depth = float(np.median(np.concatenate(levels)))
    cap = interior_fraction * float(np.median(sigma[interior])) if interior.any() else np.inf
    tau = min(tau_depth, cap)
    if not tau > 0:
        tau = 0.5 * smax
    log.info(
        "auto threshold %.4g (level at rendered depth %.4g, interior cap %.4g, max %.4g)", tau, tau_depth, cap, smax
    )
    return tau


def largest_component(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """The connected piece (by shared edges) with the largest surface area."""
    if len(mesh.faces) == 0:
        return mesh.copy()
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    if labels.max() == 0:
        return mesh.copy()
    area = np.bincount(labels, weights=mesh.area_faces)
    faces = np.asarray(mesh.faces)[labels == int(area.argmax())]
    used, inverse = np.unique(faces.reshape(-1), return_inverse=True)
    verts = np.asarray(mesh.vertices)[used]
    return trimesh.Trimesh(verts, inverse.reshape(-1, 3), process=False, metadata=dict(mesh.metadata))


def decimate(mesh: trimesh.Trimesh, max_faces: int) -> trimesh.Trimesh:
    """Quadric decimation (fast-simplification) to at most `max_faces` faces; a copy if already under."""
    max_faces = int(max_faces)
    if max_faces < 4:
        raise ValueError("max_faces must be >= 4")
    if len(mesh.faces) <= max_faces:
        return mesh.copy()
    target = max_faces
    out = mesh
    for _ in range(6):
        out = mesh.simplify_quadric_decimation(face_count=target)
        if len(out.faces) <= max_faces:
            break
        target = max(4, int(target * max_faces / len(out.faces)) - 1)
    if len(out.faces) > max_faces:
        raise RuntimeError(f"decimation could not reach {max_faces} faces (got {len(out.faces)})")
    out.remove_unreferenced_vertices()
    return out


def orient_outward(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Consistent winding with normals pointing outward (a new mesh; visuals are not kept).

    Watertight: the signed volume must be positive. Open meshes: the area-weighted normals must on
    the whole point away from the centroid (a heuristic, right for blob-like shapes). Computed
    from vertices and faces directly, never from trimesh's caches (stale after in-place edits).
    """
    faces = np.asarray(mesh.faces, dtype=np.int64)
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    out = trimesh.Trimesh(verts, faces, process=False, metadata=dict(mesh.metadata))
    if len(faces) == 0:
        return out
    if not out.is_winding_consistent:
        trimesh.repair.fix_winding(out)
        faces = np.asarray(out.faces, dtype=np.int64)
    tri = verts[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # 2 * area * normal
    if out.is_watertight:
        score = float(np.einsum("ij,ij->i", cross, tri[:, 0]).sum())  # 6 * signed volume
    else:
        score = float(np.einsum("ij,ij->i", cross, tri.mean(1) - verts[np.unique(faces)].mean(0)).sum())
    if score < 0:
        faces = faces[:, ::-1].copy()
    return trimesh.Trimesh(verts, faces, process=False, metadata=dict(mesh.metadata))


def extract_mesh(
    density_fn: DensityFn,
    resolution: int = 128,
    bound: float | Sequence = 1.0,
    threshold: float | None = None,
    *,
    max_faces: int | None = None,
    keep_largest: bool = True,
    chunk: int = 1 << 16,
    device: torch.device | str = "cpu",
) -> trimesh.Trimesh:
    """A closed, outward-facing surface of the density field, in world coordinates.

    density_fn maps world points [N,3] to densities [N] or [N,1] (>= 0; negatives are clamped).
    threshold=None picks the level automatically (module docstring). The grid is padded with empty
    cells so the surface closes at the box faces. mesh.metadata gets "threshold" and "resolution".
    """
    sigma, lo, spacing = sample_grid(density_fn, resolution, bound, chunk=chunk, device=device)
    sigma = np.nan_to_num(sigma, nan=0.0, posinf=np.float32(3e38)).clip(min=0.0)
    tau = auto_threshold(sigma, spacing) if threshold is None else float(threshold)
    if not tau > 0:
        raise ValueError(f"threshold must be > 0, got {tau}")
    if sigma.max() <= tau:
        raise ValueError(f"no density above the threshold {tau:.4g} (max {float(sigma.max()):.4g}): nothing to extract")
    padded = np.pad(sigma, 1, mode="constant", constant_values=0.0)
    verts, faces = mcubes.marching_cubes(padded, tau)
    if len(faces) == 0:
        raise ValueError("marching cubes produced no faces")
    verts = lo[None] + (verts - 1.0) * spacing[None]
    mesh = clean_mesh(verts, faces, keep_largest=keep_largest, max_faces=max_faces)
    mesh.metadata.update(
        {
            "threshold": tau,
            "resolution": int(resolution),
            "bound": [lo.tolist(), (lo + spacing * (int(resolution) - 1)).tolist()],
        }
    )
    return mesh


def clean_mesh(verts, faces, *, keep_largest: bool = True, max_faces: int | None = None) -> trimesh.Trimesh:
    """Merge duplicate vertices, keep the largest piece, decimate, drop mirrored face pairs, orient outward."""
    mesh = trimesh.Trimesh(np.asarray(verts, dtype=np.float64), np.asarray(faces, dtype=np.int64), process=True)
    if keep_largest:
        mesh = largest_component(mesh)
    if max_faces is not None:
        mesh = drop_mirrored_pairs(decimate(mesh, max_faces))
    return orient_outward(mesh)


def drop_mirrored_pairs(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Without the faces whose three vertices another face also has (a triangle and its mirror image).

    Quadric decimation can collapse a thin region into such a pair: a flap of zero volume hinged
    on an edge of the surface, which makes that edge non-manifold, so a closed surface stops
    being watertight. Seen on a refined red cube: a 2-face flap of area 5e-5 beside 9998 faces.
    Both faces go; a flap's edges then belong to the surface alone again."""
    faces = np.asarray(mesh.faces, dtype=np.int64)
    if len(faces) == 0:
        return mesh
    _, inverse, counts = np.unique(np.sort(faces, axis=1), axis=0, return_inverse=True, return_counts=True)
    keep = counts[inverse.reshape(-1)] == 1
    if keep.all():
        return mesh
    out = trimesh.Trimesh(np.asarray(mesh.vertices), faces[keep], process=False, metadata=dict(mesh.metadata))
    out.remove_unreferenced_vertices()
    return out
