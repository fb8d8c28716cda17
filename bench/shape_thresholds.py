"""Where the cube gate's thresholds come from (t3d.toy.shape_metrics): the 3D metrics of the true
cube, of rounded cubes and of a drum, each extracted the ways the pipeline extracts a surface.

Extractions (all over the field's bound [-1, 1], decimated to extract_mesh's 10k faces):
marching cubes of the exact SDF at 96 (extract_mesh.resolution) and 64; marching tets at 64
(extract_mesh.geometry.resolution) of the exact SDF, and of the SDF that the DMTet step rebuilds
from an occupancy grid (sdf_from_density of a perfect field). Rounded cubes keep the cube's outer
size: sdf_box(p, half - r) - r. The drum is the cylinder SDF with the cube's half-width as radius
and half-height. ~10 s on one core.
Last output: one JSON object {"rows": [...], "thresholds": {...}}.
Usage: python bench/shape_thresholds.py
"""

from __future__ import annotations

import json

import mcubes
import numpy as np
import torch

from t3d.mesh.dmtet import marching_tets, sdf_from_density, tet_grid
from t3d.mesh.extract import clean_mesh
from t3d.toy import shape_metrics
from t3d.toy import world as toyworld

HALF = toyworld.CUBE_HALF
RADII = (0.05, HALF / 4, 0.15, HALF / 2)
MAX_FACES = 10000


def _grid(sdf_fn, res: int) -> np.ndarray:
    axis = np.linspace(-1.0, 1.0, res)
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    with torch.no_grad():
        return sdf_fn(torch.from_numpy(points)).numpy().reshape(res, res, res)


def marching_cubes_mesh(sdf_fn, res: int) -> tuple[np.ndarray, np.ndarray]:
    verts, faces = mcubes.marching_cubes(-_grid(sdf_fn, res), 0.0)
    return _clean(verts * (2.0 / (res - 1)) - 1.0, faces)


def marching_tets_mesh(sdf_fn, res: int, via_occupancy: bool = False) -> tuple[np.ndarray, np.ndarray]:
    spacing = 2.0 / (res - 1)
    sdf = _grid(sdf_fn, res)
    if via_occupancy:
        sdf = sdf_from_density((sdf < 0).astype(np.float32), 0.5, spacing)
    tverts, tets = tet_grid(res, np.full(3, -1.0), np.full(3, spacing))
    verts, faces = marching_tets(tverts, tets, torch.as_tensor(sdf, dtype=torch.float32).reshape(-1))
    return _clean(verts.numpy(), faces.numpy())


def _clean(verts, faces) -> tuple[np.ndarray, np.ndarray]:
    mesh = clean_mesh(verts, faces, max_faces=MAX_FACES)
    return np.asarray(mesh.vertices), np.asarray(mesh.faces)


EXTRACTIONS = {
    "mc96": lambda fn: marching_cubes_mesh(fn, 96),
    "mc64": lambda fn: marching_cubes_mesh(fn, 64),
    "tets64": lambda fn: marching_tets_mesh(fn, 64),
    "tets64_occupancy": lambda fn: marching_tets_mesh(fn, 64, via_occupancy=True),
}


def rounded_cube(r: float):
    return lambda p: toyworld._sdf_box(p, HALF - r) - r


def drum(p: torch.Tensor) -> torch.Tensor:
    return toyworld._sdf_cylinder(p, HALF, HALF)


def main() -> None:
    candidates = {"true cube": lambda p: toyworld.sdf("cube", p)}
    candidates.update({f"rounded r={r:.3f}": rounded_cube(r) for r in RADII})
    candidates["drum"] = drum
    rows = []
    for name, fn in candidates.items():
        for how, extract in EXTRACTIONS.items():
            verts, faces = extract(fn)
            m = shape_metrics.mesh_shape_metrics(verts, faces, "cube")
            rows.append({"mesh": name, "extraction": how, **m, "passes": shape_metrics.cube_gate({**m, "iou": 1.0})})
    ref = [r for r in rows if r["mesh"] == f"rounded r={HALF / 4:.3f}"]
    rule = {
        "normal_consistency": min(r["normal_consistency"] for r in ref),
        "edge_sharpness": min(r["edge_sharpness"] for r in ref),
    }
    print(
        json.dumps(
            {
                "rows": rows,
                "worst_r_quarter_half": rule,
                "thresholds": {
                    "normal_consistency": shape_metrics.CUBE_MIN_NORMAL_CONSISTENCY,
                    "edge_sharpness": shape_metrics.CUBE_MIN_EDGE_SHARPNESS,
                    "iou": shape_metrics.CUBE_MIN_IOU,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
