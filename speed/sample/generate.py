"""Class-conditional sampling with per-sample randomness.

Sample ``i`` of a job with seed ``s`` draws its initial noise and every per-step noise from its own
generator seeded by (s, i), so its image does not depend on which batch or worker it lands in:
the same indices give the same images with one actor or with many.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from speed.config.schema import FLOW_SAMPLERS, ConfigError, SamplingConfig
from speed.config.validate import check_objective
from speed.diffusion import guided_model
from speed.diffusion.factory import build_sampling_diffusion
from speed.seeding import stream_seed
from speed.train.export import ModelDescription

IndexLike = Union[Sequence[int], np.ndarray, torch.Tensor]

# Streams keep the label draw and the noise of one index independent of each other.
NOISE_STREAM = "sample-noise"
LABEL_STREAM = "sample-label"


def sample_seed(seed: int, index: int, stream: str = NOISE_STREAM) -> int:
    """A 63-bit seed that is a pure function of (seed, index, stream) (``speed.seeding``)."""
    return stream_seed(seed, stream, int(index))


def sample_generators(seed: int, indices: IndexLike) -> List[torch.Generator]:
    """One CPU generator per sample index (CPU so the draws are identical on every device)."""
    return [torch.Generator(device="cpu").manual_seed(sample_seed(seed, int(i))) for i in _as_list(indices)]


def sample_labels(indices: IndexLike, num_classes: int, mode: str = "balanced", seed: int = 0) -> np.ndarray:
    """Class label of each sample index: ``balanced`` is index modulo classes, ``random`` is a seeded
    uniform draw per index. Either way a label depends only on (mode, seed, index)."""
    indices = _as_list(indices)
    if mode == "balanced":
        return np.asarray([i % num_classes for i in indices], dtype=np.int64)
    if mode == "random":
        return np.asarray([sample_seed(seed, i, LABEL_STREAM) % num_classes for i in indices], dtype=np.int64)
    raise ConfigError(f"inference.labels={mode!r} is not valid; choose balanced or random")


@lru_cache(maxsize=16)
def _cached_diffusion(num_timesteps: int, schedule: str, learn_sigma: bool, sampler: str, steps: int):
    return build_sampling_diffusion(num_timesteps, schedule, learn_sigma, sampler, steps)


def sampling_diffusion(description: ModelDescription, sampling_cfg: SamplingConfig):
    """The respaced diffusion that ``sampling.sampler`` / ``sampling.steps`` describe for this model
    (the flow path for a flow sampler); a sampler of the other objective is refused."""
    objective = getattr(description, "objective", "ddpm")
    check_objective(objective, sampling_cfg.sampler, "the objective this model was trained with")
    try:
        return _cached_diffusion(
            int(description.num_timesteps),
            description.schedule,
            bool(description.model.get("learn_sigma", True)),
            sampling_cfg.sampler,
            int(sampling_cfg.steps),
        )
    except ValueError as exc:
        raise ConfigError(
            f"sampling.steps={sampling_cfg.steps} does not work with sampling.sampler={sampling_cfg.sampler} "
            f"on a {description.num_timesteps}-step schedule ({exc}); pick e.g. 25, 50, 100 or 250"
        ) from None


def guided_forward(model: torch.nn.Module, description: ModelDescription, sampling_cfg: SamplingConfig):
    """The model call the sampler uses: plain, or classifier-free guided when guidance_scale != 1."""
    scale = float(sampling_cfg.guidance_scale)
    if scale == 1.0:
        return model
    model_cfg = description.model
    if not model_cfg.get("class_dropout_prob", 0.0) > 0:
        raise ConfigError(
            f"sampling.guidance_scale={scale} needs a model trained with label dropout (it has no null class: "
            "model.class_dropout_prob=0); set sampling.guidance_scale=1"
        )
    return guided_model(
        model,
        guidance_scale=scale,
        null_class=int(model_cfg["num_classes"]),
        guidance_channels=sampling_cfg.guidance_channels,
        learn_sigma=bool(model_cfg.get("learn_sigma", True)),
        in_channels=int(description.in_channels),
    )


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C].

    Same rounding as DiT's sample_ddp.py (127.5 x + 128, clamped, truncated), so converted DiT
    checkpoints reproduce its published sample statistics.
    """
    scaled = torch.clamp(127.5 * images.float() + 128.0, 0, 255)
    return scaled.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).contiguous().numpy()


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    # In train mode DiT drops labels at random; sampling must always see them.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_tensor(
    model: torch.nn.Module,
    description: ModelDescription,
    sampling_cfg: SamplingConfig,
    labels: IndexLike,
    seeds_or_indices: IndexLike,
    seed: int,
    device: Union[str, torch.device],
    vae=None,
) -> torch.Tensor:
    """Like ``generate`` but returns float32 images [N, C, H, W] in [-1, 1] on the CPU."""
    labels_list = _as_list(labels)
    indices = _as_list(seeds_or_indices)
    if len(labels_list) != len(indices):
        raise ValueError(f"generate: got {len(labels_list)} labels for {len(indices)} sample indices")
    if not indices:
        channels = 3 if description.is_latent else description.in_channels
        return torch.zeros(0, channels, description.resolution, description.resolution)
    num_classes = int(description.model["num_classes"])
    if min(labels_list) < 0 or max(labels_list) >= num_classes:
        raise ValueError(f"generate: labels must lie in [0, {num_classes}), got {min(labels_list)}..{max(labels_list)}")
    if description.is_latent and vae is None:
        raise ConfigError("vae.path is not set; this model samples latents, which need the VAE to decode them")
    if description.is_latent and abs(float(vae.scale_factor) - float(description.latent_scale)) > 1e-9:
        raise ConfigError(
            f"vae.scale_factor={vae.scale_factor} differs from the model's latent scale {description.latent_scale} "
            "(data.latent_scale it was trained with); load the VAE with the export's latent_scale"
        )

    device = torch.device(device)
    diffusion = sampling_diffusion(description, sampling_cfg)
    forward = guided_forward(model, description, sampling_cfg)
    shape = (len(indices), description.in_channels, description.input_size, description.input_size)
    generators = sample_generators(seed, indices)
    y = torch.tensor(labels_list, dtype=torch.long, device=device)
    # Latents are not bounded to [-1, 1]; DiT samples them with clip_denoised=False.
    clip = bool(sampling_cfg.clip_denoised) and not description.is_latent
    with _eval_mode(model):
        if sampling_cfg.sampler in FLOW_SAMPLERS:
            out = diffusion.sample_loop(
                forward, shape, steps=int(sampling_cfg.steps), method=sampling_cfg.sampler,
                model_kwargs={"y": y}, device=device, generator=generators,
            )
        elif sampling_cfg.sampler == "ddim":
            out = diffusion.ddim_sample_loop(
                forward, shape, model_kwargs={"y": y}, device=device, clip_denoised=clip,
                eta=float(sampling_cfg.eta), generator=generators,
            )
        else:
            out = diffusion.p_sample_loop(
                forward, shape, model_kwargs={"y": y}, device=device, clip_denoised=clip, generator=generators,
            )
    if description.is_latent:
        out = vae.decode(out)  # divides by the latent scale itself
    return out.float().cpu()


def generate(
    model: torch.nn.Module,
    description: ModelDescription,
    sampling_cfg: SamplingConfig,
    labels: IndexLike,
    seeds_or_indices: IndexLike,
    seed: int,
    device: Union[str, torch.device],
    vae=None,
) -> np.ndarray:
    """Sample one image per (label, index) and return uint8 images [N, H, W, C].

    ``seeds_or_indices[k]`` is the sample index whose noise image k uses (with ``seed``); the
    sampler, step count, guidance and clipping come from ``sampling_cfg``. Latent models need
    ``vae`` (speed.data.vae.VAE, loaded with the export's latent scale).
    """
    images = generate_tensor(model, description, sampling_cfg, labels, seeds_or_indices, seed, device, vae)
    return to_uint8(images)


def _as_list(values: Optional[IndexLike]) -> List[int]:
    if values is None:
        return []
    if isinstance(values, torch.Tensor):
        return [int(v) for v in values.reshape(-1).tolist()]
    return [int(v) for v in np.asarray(values).reshape(-1).tolist()]
