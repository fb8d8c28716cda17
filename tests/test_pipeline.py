"""The whole pipeline (encode -> coarse -> refine -> mesh -> texture -> export) on a tiny prior:
stages connect, the deliverable is a valid textured GLB, editing texture params re-runs only the
texture stage and export."""

from __future__ import annotations

import textwrap

import torch
import trimesh

from t3d.fields.hashgrid import choose_hashgrid
from t3d.fields.nerf import FieldParams, NeRFField
from t3d.flows.config import load_config
from t3d.flows.flow import run_prompt
from t3d.render.cameras import CameraParams, sample_cameras
from t3d.render.raster import TorchRaster, render_mesh
from t3d.stages import default_registry
from t3d.stages.texture import shade_mesh_image
from tests.gltf_check import assert_valid_glb
from tests.grids import TINY_GRID

TINY = textwrap.dedent("""
    prompt: a red cube
    prior: tiny-pixel
    store: ./store
    stages:
      coarse: {steps: 3, checkpoint_every: 2, preview_frames: 4, preview_size: 32, n_samples: 16}
      refine: {enabled: true, steps: 2, preview_frames: 4, preview_size: 32, n_samples: 16}
      extract_mesh: {resolution: 32, texture_size: 128, preview_frames: 4, preview_size: 32,
                     geometry: {steps: 3, resolution: 24, render_size: 32}}
      texture: {steps: 2, guidance: vsd, texture_size: 128, preview_frames: 4, preview_size: 32, resolution: 32}
      export: {turntable_frames: 4, turntable_size: 32}
    """)


def test_full_pipeline_on_tiny_prior(tmp_path):
    flow = tmp_path / "flow.yaml"
    flow.write_text(TINY)
    reg = default_registry()
    cfg = load_config(flow, registry=reg)
    result = run_prompt(cfg, cfg.prompt, reg, flow_file=str(flow), use_prefect=False, show_progress=False)
    assert result.state == "completed", result.error
    assert [r.stage for r in result.results] == [
        "encode_prompt",
        "coarse",
        "refine",
        "extract_mesh",
        "texture",
        "export",
    ]
    export = result.results[-1]
    glb = tmp_path / "store" / "objects" / export.key / "a-red-cube.glb"
    mesh = trimesh.load(glb, force="mesh")
    assert len(mesh.faces) > 0 and mesh.visual.uv is not None and mesh.visual.material.baseColorTexture is not None
    for name in ("a-red-cube.obj", "a-red-cube.mtl", "a-red-cube.png", "turntable.gif", "turntable.mp4"):
        assert (glb.parent / name).exists(), name
    assert {"iou", "color_err"} <= set(export.metrics), "toy prompts are scored on the delivered file"
    assert_valid_glb(glb)

    edited = load_config(flow, ["stages.texture.steps=3"], registry=reg)
    again = run_prompt(edited, edited.prompt, reg, flow_file=str(flow), use_prefect=False, show_progress=False)
    assert [r.state for r in again.results] == ["cached"] * 4 + ["computed"] * 2


def test_texture_gradients_reach_the_field_through_the_rasterizer():
    field = NeRFField(
        FieldParams(
            grid=TINY_GRID,
            hidden=16,
        ),
        choose_hashgrid("torch", "cpu"),
    )
    box = trimesh.creation.box(extents=(0.8, 0.8, 0.8))
    verts = torch.as_tensor(box.vertices, dtype=torch.float32)
    faces = torch.as_tensor(box.faces, dtype=torch.int64)
    cams = sample_cameras(CameraParams(), 2, torch.Generator().manual_seed(0))
    rendered = render_mesh(verts, faces, cams, 24, raster=TorchRaster("cpu"))
    img = shade_mesh_image(field, rendered, cams, "lambertian", 0.35)
    assert img.shape == (2, 3, 24, 24)
    background = rendered["mask"][..., 0] == 0
    assert torch.allclose(img.permute(0, 2, 3, 1)[background], torch.ones(1, 3))
    (img * torch.randn_like(img)).sum().backward()
    grads = [p.grad for p in field.encoding.parameters()] + [p.grad for p in field.mlp.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
