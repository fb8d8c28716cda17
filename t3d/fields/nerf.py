"""The coarse stage's radiance field: hash-grid encoded density + albedo, inside a bounding sphere.

Density follows DreamFusion/Magic3D as threestudio implements it: raw MLP output plus a "blob"
bias that starts the optimisation from a soft ball at the centre, then softplus or truncated
exp. Albedo is a sigmoid head. Normals come from finite differences of the raw density, which
works the same with tinycudann (no double backward needed) and the pure-torch grid, and keeps
normals differentiable for the orientation loss and Lambertian shading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from t3d.backends import BackendChoice
from t3d.fields.hashgrid import DEFAULT_CPU_CONFIG, HashGridBackend


class FieldParams(BaseModel):
    """Everything that defines a NeRFField's architecture (saved as JSON next to its weights)."""

    model_config = ConfigDict(extra="forbid")

    grid: dict = Field(default_factory=lambda: dict(DEFAULT_CPU_CONFIG), description="tinycudann HashGrid config")
    hidden: int = Field(64, ge=8)
    n_hidden_layers: int = Field(1, ge=1)
    bound: float = Field(1.0, gt=0, description="radius of the bounding sphere; nothing exists outside")
    density_activation: Literal["softplus", "trunc_exp"] = "softplus"
    density_shift: float = Field(0.0, description="added to the raw density before the activation")
    blob: Literal["magic3d", "dreamfusion", "none"] = "magic3d"
    blob_density: float = Field(10.0, description="raw density added at the centre")
    blob_radius: float = Field(0.5, gt=0, description="magic3d: bias reaches 0 here; dreamfusion: Gaussian std")
    background: Literal["white", "black", "learned"] = "white"
    bg_hidden: int = Field(16, ge=4)
    normal_eps: float = Field(0.01, gt=0, description="finite-difference step for normals (world units)")
    normal_method: Literal["central", "forward"] = "central"

    @classmethod
    def from_saved(cls, config: dict) -> FieldParams:
        """FieldParams from a saved field.json. Artifacts never pin a backend: a `backend` request that
        t3d wrote there before flow.yaml's `backends:` existed is dropped, and so is the `seed` of
        fields saved before the flow's seed drew the initial weights."""
        return cls.model_validate({k: v for k, v in config.items() if k not in ("backend", "seed")})


class _TruncExp(torch.autograd.Function):
    """exp with its gradient clamped (Instant-NGP / torch-ngp): keeps early densities from exploding."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(-15, 15))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


class NeRFField(nn.Module):
    """density [N] >= 0 and albedo [N,3] in [0,1] at world points [N,3]. `seed` draws the initial
    weights (a stage passes one derived from the flow's seed)."""

    def __init__(self, params: FieldParams, hashgrid: HashGridBackend, seed: int = 0):
        super().__init__()
        self.params = params
        p = self.params
        self.hashgrid = hashgrid
        self.encoding = hashgrid.encoding(p.grid, seed=seed)
        gen = torch.Generator().manual_seed(seed + 1)
        layers: list[nn.Module] = []
        width_in = self.encoding.n_output_dims
        for _ in range(p.n_hidden_layers):
            layers += [nn.Linear(width_in, p.hidden), nn.ReLU(inplace=True)]
            width_in = p.hidden
        layers.append(nn.Linear(width_in, 4))
        self.mlp = nn.Sequential(*layers)
        if p.background == "learned":
            self.bg_mlp = nn.Sequential(nn.Linear(3, p.bg_hidden), nn.ReLU(inplace=True), nn.Linear(p.bg_hidden, 3))
        else:
            self.bg_mlp = None
        for m in list(self.mlp) + list(self.bg_mlp or []):
            if isinstance(m, nn.Linear):
                bound = 1.0 / m.in_features**0.5
                with torch.no_grad():
                    m.weight.uniform_(-bound, bound, generator=gen)
                    m.bias.zero_()
        self.to(hashgrid.device)

    @property
    def device(self) -> torch.device:
        return self.mlp[0].weight.device

    @property
    def backend(self) -> BackendChoice:
        """What built the encoding (tinycudann or the torch twin), for the stage manifest."""
        return self.hashgrid.choice

    # ---- pieces ----------------------------------------------------------------------------
    def inside(self, points: torch.Tensor) -> torch.Tensor:
        return points.square().sum(-1) <= self.params.bound**2

    def density_bias(self, points: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.blob == "none" or p.blob_density == 0:
            return points.new_zeros(points.shape[0])
        r2 = points.square().sum(-1)
        if p.blob == "magic3d":
            return p.blob_density * (1 - r2.clamp_min(1e-12).sqrt() / p.blob_radius)
        return p.blob_density * torch.exp(-0.5 * r2 / p.blob_radius**2)

    def _activate(self, raw: torch.Tensor) -> torch.Tensor:
        raw = raw + self.params.density_shift
        if self.params.density_activation == "softplus":
            return F.softplus(raw)
        return trunc_exp(raw)

    def _mlp(self, points: torch.Tensor) -> torch.Tensor:
        x = (points / self.params.bound + 1.0) * 0.5  # bounding sphere -> inside the unit cube
        feats = self.encoding(x.clamp(0.0, 1.0))
        return self.mlp(feats.to(self.mlp[0].weight.dtype))

    def raw_density(self, points: torch.Tensor) -> torch.Tensor:
        """Pre-activation density incl. the blob bias [N]; the normals differentiate this."""
        return self._mlp(points)[:, 0] + self.density_bias(points)

    # ---- the interface ---------------------------------------------------------------------
    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        density, albedo, _ = self.query(points)
        return density, albedo

    def query(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(density [N], albedo [N,3], raw density [N]) from one network evaluation."""
        out = self._mlp(points)
        raw = out[:, 0] + self.density_bias(points)
        density = self._activate(raw) * self.inside(points).to(raw.dtype)
        albedo = torch.sigmoid(out[:, 1:4])
        return density, albedo, raw

    def density(self, points: torch.Tensor) -> torch.Tensor:
        return self._activate(self.raw_density(points)) * self.inside(points).to(points.dtype)

    def normals(self, points: torch.Tensor, raw_at_points: torch.Tensor | None = None) -> torch.Tensor:
        """Unit outward normals [N,3] = -grad(raw density), by finite differences (differentiable)."""
        eps = self.params.normal_eps
        n = points.shape[0]
        offsets = torch.eye(3, device=points.device, dtype=points.dtype) * eps
        if self.params.normal_method == "central":
            shifted = torch.cat([points[None] + offsets[:, None], points[None] - offsets[:, None]]).reshape(-1, 3)
            raw = self.raw_density(shifted).view(2, 3, n)
            grad = (raw[0] - raw[1]).t() / (2 * eps)
        else:
            shifted = (points[None] + offsets[:, None]).reshape(-1, 3)
            raw = self.raw_density(shifted).view(3, n)
            base = raw_at_points if raw_at_points is not None else self.raw_density(points)
            grad = (raw - base[None]).t() / eps
        return -F.normalize(grad, dim=-1, eps=1e-8)

    def background(self, dirs: torch.Tensor) -> torch.Tensor:
        """Background colour [N,3] for unit ray directions [N,3]."""
        bg = self.params.background
        if bg == "learned":
            return torch.sigmoid(self.bg_mlp(dirs))
        value = 1.0 if bg == "white" else 0.0
        return dirs.new_full((dirs.shape[0], 3), value)

    def config_dict(self) -> dict:
        """The architecture as saved next to the weights (field.json). It names no backend: the one
        that ran is in the stage manifest, and the weights load under either."""
        return self.params.model_dump(mode="json")


# ---- on disk: weights as safetensors, the architecture as JSON ------------------------------
FIELD_FILE = "field.safetensors"
FIELD_CONFIG = "field.json"


def save_field(field: NeRFField, folder: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in field.state_dict().items()}, str(Path(folder) / FIELD_FILE))
    (Path(folder) / FIELD_CONFIG).write_text(json.dumps(field.config_dict(), indent=2))


def load_field(folder: Path, hashgrid: HashGridBackend) -> NeRFField:
    """A field written by save_field (the coarse and refine stages' artifact), ready to render or
    train under `hashgrid`, whichever backend wrote it."""
    cfg = json.loads((Path(folder) / FIELD_CONFIG).read_text())
    field = NeRFField(FieldParams.from_saved(cfg), hashgrid)
    field.load_state_dict(load_file(str(Path(folder) / FIELD_FILE), device=str(hashgrid.device)))
    return field
