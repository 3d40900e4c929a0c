"""Value checks that the type system cannot express; every message names the full dotted key."""

from __future__ import annotations

import re
from typing import Any, Iterable, Tuple

from speed.config.schema import Config, ConfigError, RayConfig

DATA_FORMATS = ("digits", "imagefolder", "parquet", "latents")
RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


def _positive(key: str, value: Any, allow_zero: bool = False) -> None:
    if value is None or (value < 0 if allow_zero else value <= 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} is not valid; it must be {bound}")


def num_workers_range(ray: RayConfig) -> Tuple[int, int]:
    """``ray.num_workers`` as (min, max); an int n gives (n, n)."""
    value = ray.num_workers
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        low = high = value
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        low, high = value
    else:
        raise ConfigError(
            f"ray.num_workers={value!r} is not valid; give an int (e.g. 8) or [min, max] for elastic "
            "training (e.g. [4, 8])"
        )
    if low < 1 or high < low:
        raise ConfigError(f"ray.num_workers={value!r} is not valid; need 1 <= min <= max")
    return low, high


def validate_config(cfg: Config) -> None:
    from speed.diffusion import TIMESTEP_STRATEGIES
    from speed.models import DIT_PRESETS

    if not RUN_NAME_PATTERN.match(cfg.run.name):
        raise ConfigError(
            f"run.name={cfg.run.name!r} is not valid; use letters, digits, '.', '_' and '-' "
            "(it becomes a folder name)"
        )
    if not cfg.run.output_uri:
        raise ConfigError("run.output_uri is empty; give a local folder or s3://bucket/prefix")

    if cfg.model.name not in DIT_PRESETS:
        import difflib

        close = difflib.get_close_matches(cfg.model.name, list(DIT_PRESETS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(
            f"model.name={cfg.model.name!r} is not a known preset{hint}; valid: {', '.join(DIT_PRESETS)}"
        )
    _positive("model.num_classes", cfg.model.num_classes)
    if not 0.0 <= cfg.model.class_dropout_prob < 1.0:
        raise ConfigError(f"model.class_dropout_prob={cfg.model.class_dropout_prob} must be in [0, 1)")

    diffusion = cfg.diffusion
    _positive("diffusion.num_timesteps", diffusion.num_timesteps)
    _choice("diffusion.schedule", diffusion.schedule, ("linear", "cosine"))
    timesteps = diffusion.timesteps
    _choice("diffusion.timesteps.name", timesteps.name, TIMESTEP_STRATEGIES)
    if timesteps.sampling is not None:
        _choice("diffusion.timesteps.sampling", timesteps.sampling, TIMESTEP_STRATEGIES)
    if timesteps.weighting is not None:
        _choice("diffusion.timesteps.weighting", timesteps.weighting, TIMESTEP_STRATEGIES)
    # Build the strategy once: bad parameters (e.g. non-positive weights, tau beyond T) fail here.
    from speed.diffusion.factory import build_strategy_from_config

    try:
        build_strategy_from_config(diffusion)
    except ValueError as exc:
        raise ConfigError(f"diffusion.timesteps: {exc}") from exc

    data = cfg.data
    _choice("data.format", data.format, DATA_FORMATS)
    if data.format != "digits" and not data.uri:
        raise ConfigError(f"data.uri is empty; data.format={data.format} needs a local path or s3:// URI")
    _positive("data.resolution", data.resolution)
    _choice("data.channels", data.channels, (1, 3, 4))
    _choice("data.on_error", data.on_error, ("skip", "raise"))
    if data.format == "latents" and data.resolution % 8:
        raise ConfigError(f"data.resolution={data.resolution} must be a multiple of 8 for latents")
    _positive("data.latent_scale", data.latent_scale)
    _positive("data.shuffle_buffer", data.shuffle_buffer, allow_zero=True)
    _positive("data.read_cpus", data.read_cpus)

    _positive("optim.lr", cfg.optim.lr)
    _positive("optim.weight_decay", cfg.optim.weight_decay, allow_zero=True)
    _positive("optim.warmup_steps", cfg.optim.warmup_steps, allow_zero=True)
    _positive("optim.grad_clip", cfg.optim.grad_clip, allow_zero=True)
    _choice("optim.implementation", cfg.optim.implementation, ("auto", "fused", "foreach"))
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg.optim, key) < 1.0:
            raise ConfigError(f"optim.{key}={getattr(cfg.optim, key)} must be in [0, 1)")

    train = cfg.train
    _positive("train.steps", train.steps)
    _positive("train.global_batch_size", train.global_batch_size)
    _positive("train.micro_batch_size", train.micro_batch_size)
    _positive("train.log_every", train.log_every)
    for key in ("checkpoint_every", "sample_every", "eval_every"):
        _positive(f"train.{key}", getattr(train, key), allow_zero=True)
    _positive("train.eval_num_samples", train.eval_num_samples)
    if not 0.0 < train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={train.ema_decay} must be in (0, 1), e.g. 0.9999")
    _positive("train.keep_checkpoints", train.keep_checkpoints)
    _choice("train.on_nonfinite", train.on_nonfinite, ("raise", "skip"))

    _choice("parallel.strategy", cfg.parallel.strategy, ("fsdp", "ddp", "none"))
    _choice("parallel.mixed_precision", cfg.parallel.mixed_precision, ("auto", "bf16", "fp32"))

    sampling = cfg.sampling
    _choice("sampling.sampler", sampling.sampler, ("ddpm", "ddim"))
    if not 1 <= sampling.steps <= diffusion.num_timesteps:
        raise ConfigError(
            f"sampling.steps={sampling.steps} must be between 1 and diffusion.num_timesteps="
            f"{diffusion.num_timesteps}"
        )
    _positive("sampling.guidance_scale", sampling.guidance_scale, allow_zero=True)
    _choice("sampling.guidance_channels", sampling.guidance_channels, ("all", "first3"))
    _positive("sampling.eta", sampling.eta, allow_zero=True)

    inference = cfg.inference
    _positive("inference.num_samples", inference.num_samples)
    _positive("inference.batch_size", inference.batch_size)
    _positive("inference.num_actors", inference.num_actors)
    _positive("inference.num_gpus_per_actor", inference.num_gpus_per_actor, allow_zero=True)
    _choice("inference.labels", inference.labels, ("balanced", "random"))
    _positive("sample.per_class", cfg.sample.per_class)
    for label in cfg.sample.classes:
        if not 0 <= label < cfg.model.num_classes:
            raise ConfigError(
                f"sample.classes contains {label}, outside [0, model.num_classes={cfg.model.num_classes})"
            )

    _choice("eval.feature_extractor", cfg.eval.feature_extractor, ("digits", "inception"))
    _positive("eval.batch_size", cfg.eval.batch_size)
    _positive("eval.pr_k", cfg.eval.pr_k)
    _positive("eval.num_actors", cfg.eval.num_actors)

    _choice("prepare.task", cfg.prepare.task, ("digits", "encode"))
    _choice("prepare.format", cfg.prepare.format, ("imagefolder", "parquet"))
    _choice("prepare.source_format", cfg.prepare.source_format, ("imagefolder", "parquet"))
    _choice("prepare.channels", cfg.prepare.channels, (1, 3))
    _positive("prepare.image_size", cfg.prepare.image_size)
    _positive("prepare.num_shards", cfg.prepare.num_shards)
    _positive("prepare.rows_per_shard", cfg.prepare.rows_per_shard)
    _choice("vae.dtype", cfg.vae.dtype, ("fp32", "bf16", "fp16"))

    low, high = num_workers_range(cfg.ray)
    if train.global_batch_size < high:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} cannot be split over "
            f"ray.num_workers={cfg.ray.num_workers} (up to {high} workers need at least one sample each); "
            "raise the batch or lower the worker count"
        )
    _positive("ray.cpus_per_worker", cfg.ray.cpus_per_worker)
    if not cfg.ray.resize_interval_s > 0:
        raise ConfigError(f"ray.resize_interval_s={cfg.ray.resize_interval_s} must be > 0 (seconds between resize checks)")
    if cfg.ray.max_failures < -1:
        raise ConfigError(f"ray.max_failures={cfg.ray.max_failures} must be -1 (infinite) or >= 0")

    endpoint = cfg.storage.endpoint_url
    if endpoint and not re.match(r"^https?://", endpoint):
        raise ConfigError(
            f"storage.endpoint_url={endpoint!r} must start with http:// or https:// "
            "(e.g. http://minio.local:9000)"
        )

    _choice("tune.mode", cfg.tune.mode, ("min", "max"))
    _choice("tune.scheduler", cfg.tune.scheduler, ("none", "asha"))
    _positive("tune.num_samples", cfg.tune.num_samples)
    _positive("tune.max_concurrent_trials", cfg.tune.max_concurrent_trials)
    if cfg.tune.search_space:
        from speed.config.load import all_keys

        known = set(all_keys())
        for key in cfg.tune.search_space:
            if key not in known:
                import difflib

                close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"tune.search_space names unknown config key '{key}'{hint}")
