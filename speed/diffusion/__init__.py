"""Gaussian diffusion (DDPM), flow matching, timestep respacing, classifier-free guidance and timestep
strategies under both objectives."""

from .flow import FlowMatching, create_flow_matching
from .gaussian import GaussianDiffusion, get_beta_schedule, guided_model
from .respace import SpacedDiffusion, create_diffusion, space_timesteps
from .timesteps import TIMESTEP_STRATEGIES, TimestepStrategy, build_timestep_strategy

__all__ = [
    "FlowMatching",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "TIMESTEP_STRATEGIES",
    "TimestepStrategy",
    "build_timestep_strategy",
    "create_diffusion",
    "create_flow_matching",
    "get_beta_schedule",
    "guided_model",
    "space_timesteps",
]
