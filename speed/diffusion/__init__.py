"""Gaussian diffusion, timestep respacing, classifier-free guidance and timestep strategies."""

from .gaussian import GaussianDiffusion, get_beta_schedule, guided_model
from .respace import SpacedDiffusion, create_diffusion, space_timesteps
from .timesteps import TIMESTEP_STRATEGIES, TimestepStrategy, build_timestep_strategy

__all__ = [
    "GaussianDiffusion",
    "SpacedDiffusion",
    "TIMESTEP_STRATEGIES",
    "TimestepStrategy",
    "build_timestep_strategy",
    "create_diffusion",
    "get_beta_schedule",
    "guided_model",
    "space_timesteps",
]
