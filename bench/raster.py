"""Rasterizer benchmark: the torch twin (and nvdiffrast where CUDA has it) on a fixed scene.

Scene: a UV sphere of 10,400 faces (radius 0.7), batch 4 orbit cameras at 256x256, a 512x512
texture. Timed (median of --repeats): rasterize, interpolate (uv + normal, 5 channels), texture
(bilinear), antialias, and backward of a loss on the antialiased textured image (to the texture
and the vertices).
The torch twin is timed with 1 intra-op thread and with torch's default; on a shared machine the
default can be far slower (OpenMP threads competing with other processes).

With CUDA and a working nvdiffrast it also times nvdiffrast and reports the fraction of pixels
whose triangle id differs between the backends (expected only along edges, from fill rules).

    python bench/raster.py [--size 256] [--batch 4] [--repeats 5] [--skip-cpu] [--dry-run]

--skip-cpu leaves out the CPU timings (on a GPU machine whose cores are busy building, say).
--dry-run parses the arguments, builds the scene on the CPU and exits.

The LAST line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import trimesh

from t3d.render.cameras import make_cameras
from t3d.render.raster import TorchRaster, choose_raster, mvp_matrices, vertex_normals


def scene(device, batch):
    m = trimesh.creation.uv_sphere(radius=0.7, count=[51, 51])
    v = torch.tensor(m.vertices, dtype=torch.float32, device=device)
    f = torch.tensor(m.faces, dtype=torch.int32, device=device)
    uv = torch.stack([0.5 + 0.5 * torch.atan2(v[:, 1], v[:, 0]) / torch.pi, 0.5 + 0.5 * v[:, 2] / 0.7], -1)
    az = [i * 360.0 / batch + 15.0 for i in range(batch)]
    cams = make_cameras(az, [20.0] * batch, 2.5, 40.0).to(device)
    g = torch.Generator().manual_seed(0)
    tex = torch.rand(1, 512, 512, 3, generator=g).to(device)
    return v, f, uv, cams, tex


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pipeline(raster, v, f, uv, cams, tex, size, repeats, device):
    times = {"rasterize": [], "interpolate": [], "texture": [], "antialias": [], "backward": [], "total": []}
    rast_keep = None
    for i in range(repeats + 1):
        verts = v.clone().requires_grad_(True)
        t_ex = tex.clone().requires_grad_(True)
        sync(device)
        t0 = time.perf_counter()
        mvp = mvp_matrices(cams)
        pos = torch.einsum("bij,vj->bvi", mvp, torch.cat([verts, torch.ones_like(verts[:, :1])], -1)).contiguous()
        rast, _ = raster.rasterize(pos, f, (size, size))
        sync(device)
        t1 = time.perf_counter()
        attr = torch.cat([uv, vertex_normals(verts, f)], -1).contiguous()
        out, _ = raster.interpolate(attr, rast, f)
        sync(device)
        t2 = time.perf_counter()
        col = raster.texture(t_ex, out[..., :2].contiguous(), filter_mode="linear", boundary_mode="wrap")
        sync(device)
        t3 = time.perf_counter()
        col = raster.antialias((col * out[..., 2:5]).contiguous(), rast, pos, f)
        sync(device)
        t3b = time.perf_counter()
        loss = col.square().mean()
        loss.backward()
        sync(device)
        t4 = time.perf_counter()
        if i == 0:
            rast_keep = rast.detach()
            assert verts.grad is not None and t_ex.grad is not None
            continue  # warm-up
        for k, dt in zip(
            ("rasterize", "interpolate", "texture", "antialias", "backward", "total"),
            (t1 - t0, t2 - t1, t3 - t2, t3b - t3, t4 - t3b, t4 - t0),
            strict=True,
        ):
            times[k].append(dt)
    return {k: round(statistics.median(x) * 1000, 2) for k, x in times.items()}, rast_keep


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="rasterizer timings: the torch twin (CPU, CUDA) and nvdiffrast")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-cpu", action="store_true", help="no CPU timings")
    ap.add_argument("--dry-run", action="store_true", help="check the arguments and the scene, then exit")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)

    cpu = torch.device("cpu")
    v, f, uv, cams, tex = scene(cpu, args.batch)
    if args.dry_run:
        print(
            json.dumps(
                {
                    "dry_run": True,
                    "faces": int(f.shape[0]),
                    "size": args.size,
                    "batch": args.batch,
                    "repeats": args.repeats,
                    "skip_cpu": args.skip_cpu,
                }
            )
        )
        return
    result = {
        "bench": "raster",
        "scene": {
            "faces": int(f.shape[0]),
            "vertices": int(v.shape[0]),
            "size": args.size,
            "batch": args.batch,
            "texture": 512,
        },
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "default_threads": torch.get_num_threads(),
        },
        "units": "ms (median)",
    }
    default_threads = torch.get_num_threads()
    if not args.skip_cpu:
        torch_cpu = {}
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            t, rast = time_pipeline(TorchRaster(cpu), v, f, uv, cams, tex, args.size, args.repeats, cpu)
            torch_cpu[f"threads_{threads}"] = t
            print(f"torch cpu, {threads} thread(s): {t}")
        torch.set_num_threads(default_threads)
        result["torch_cpu"] = torch_cpu
        result["coverage"] = round(float((rast[..., 3] > 0).float().mean()), 4)

    if torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
        result["gpu"] = torch.cuda.get_device_name(dev)
        vg, fg, uvg, camsg, texg = scene(dev, args.batch)
        t_twin, rast_twin = time_pipeline(TorchRaster(dev), vg, fg, uvg, camsg, texg, args.size, args.repeats, dev)
        result["torch_cuda"] = t_twin
        result.setdefault("coverage", round(float((rast_twin[..., 3] > 0).float().mean()), 4))
        print(f"torch twin on cuda: {t_twin}")
        raster = choose_raster("auto", dev)
        result["nvdiffrast_choice"] = raster.choice.as_dict()
        if raster.choice.backend == "nvdiffrast":
            t_nv, rast_nv = time_pipeline(raster, vg, fg, uvg, camsg, texg, args.size, args.repeats, dev)
            result["nvdiffrast"] = t_nv
            print(f"nvdiffrast: {t_nv}")
            id_a, id_b = rast_twin[..., 3], rast_nv[..., 3]
            differ = id_a != id_b
            cov_a, cov_b = id_a > 0, id_b > 0

            # a differing pixel is an edge pixel when some 4-neighbour has a different id in either backend
            def edges(ids):
                e = torch.zeros_like(ids, dtype=torch.bool)
                e[:, 1:] |= ids[:, 1:] != ids[:, :-1]
                e[:, :-1] |= ids[:, 1:] != ids[:, :-1]
                e[:, :, 1:] |= ids[:, :, 1:] != ids[:, :, :-1]
                e[:, :, :-1] |= ids[:, :, 1:] != ids[:, :, :-1]
                return e

            on_edge = edges(id_a) | edges(id_b)
            both = cov_a & cov_b
            result["backend_diff"] = {
                "triangle_id_differs": round(float(differ.float().mean()), 6),
                "coverage_differs": round(float((cov_a != cov_b).float().mean()), 6),
                "differing_off_edges": int((differ & ~on_edge).sum()),
                "max_abs_uv_diff_same_triangle": round(
                    float((rast_twin[..., :2] - rast_nv[..., :2]).abs()[both & ~differ].max()), 6
                )
                if bool((both & ~differ).any())
                else None,
            }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
