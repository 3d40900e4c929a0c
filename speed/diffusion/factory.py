"""Build diffusion processes and timestep strategies from their config sections."""

from __future__ import annotations

from speed.config.schema import DiffusionConfig
from speed.diffusion.flow import FLOW_METHODS, create_flow_matching
from speed.diffusion.gaussian import get_beta_schedule
from speed.diffusion.respace import create_diffusion
from speed.diffusion.timesteps import TIMESTEP_STRATEGIES, TimestepStrategy, build_timestep_strategy


def build_strategy_from_config(diffusion: DiffusionConfig) -> TimestepStrategy:
    """The strategy ``diffusion.timesteps`` describes, over the configured beta schedule, for
    ``diffusion.objective`` (integer steps for DDPM, float t for flow)."""
    timesteps = diffusion.timesteps
    betas = get_beta_schedule(diffusion.schedule, diffusion.num_timesteps)
    # Every strategy with parameters has a section of the same name (uniform and speed_v1 have none).
    params = {name: getattr(timesteps, name) for name in TIMESTEP_STRATEGIES if hasattr(timesteps, name)}
    return build_timestep_strategy(
        timesteps.name, betas, sampling=timesteps.sampling, weighting=timesteps.weighting, params=params,
        objective=diffusion.objective,
    )


def build_training_diffusion(diffusion: DiffusionConfig, learn_sigma: bool):
    """What training losses are computed on: the full T-step DDPM process, or the flow path."""
    if diffusion.objective == "flow":
        return create_flow_matching()
    return create_diffusion(
        num_timesteps=diffusion.num_timesteps,
        schedule=diffusion.schedule,
        learn_sigma=learn_sigma,
        timestep_respacing="",
    )


def build_sampling_diffusion(num_timesteps: int, schedule: str, learn_sigma: bool, sampler: str, steps: int):
    """A respaced process for sampling: ``steps`` DDPM steps or ``ddim<steps>``; for a flow sampler
    (euler | heun | sde) the flow path, which ``sample_loop`` integrates in ``steps`` intervals."""
    if sampler in FLOW_METHODS:
        return create_flow_matching()
    respacing = f"ddim{steps}" if sampler == "ddim" else str(steps)
    return create_diffusion(
        num_timesteps=num_timesteps, schedule=schedule, learn_sigma=learn_sigma, timestep_respacing=respacing
    )
