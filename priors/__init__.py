"""Diffusion priors behind one interface (DiffusionPrior), and the embedded toy prior.

load_prior("embedded")            # the toy prior shipped in priors/embedded/ (default)
load_prior("path/to/sd-folder")   # Stable Diffusion 1.x/2.x or DeepFloyd IF stage I, diffusers layout
load_prior("runwayml/stable-diffusion-v1-5")  # hub id, through the local HF cache
prior_identity(source)            # cheap name for artifact keys (no model load)
build_tiny_prior("pixel"|"latent", seed)  # random-weight test prior
"""

from .base import DiffusionPrior
from .loading import PriorNotFoundError, load_prior, prior_identity
from .tiny import build_tiny_prior

__all__ = ["DiffusionPrior", "PriorNotFoundError", "build_tiny_prior", "load_prior", "prior_identity"]
