"""t3d: text-to-3D by score distillation, as cached and resumable stages."""

__version__ = "0.1.0"
