"""Validation: a walk over the config tree that checks each field's metadata, then the few rules
that span several fields. Every message names the full dotted key.

The allowed values themselves sit on the fields in ``schema.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Iterator, Mapping, Tuple

from speed.config.schema import DDPM_SAMPLERS, FLOW_SAMPLERS, Config, ConfigError, num_workers_range


def iter_fields(obj: Any, prefix: str = "") -> Iterator[Tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, value) for every field of a dataclass tree, sections before their fields."""
    for f in dataclasses.fields(obj):
        key = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        yield key, f, value
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, key + ".")


def dotted_keys(obj: Any) -> list:
    return [key for key, _, _ in iter_fields(obj)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _within(value: Any, meta: Mapping[str, Any]) -> bool:
    if not _is_number(value) or math.isnan(value):
        return False
    low, high = meta.get("min"), meta.get("max")
    if low is not None and not (value > low if meta.get("min_exclusive") else value >= low):
        return False
    if high is not None and not (value < high if meta.get("max_exclusive") else value <= high):
        return False
    return True


def _describe_bounds(meta: Mapping[str, Any]) -> str:
    low, high = meta.get("min"), meta.get("max")
    if low is not None and high is not None:
        return f"in {'(' if meta.get('min_exclusive') else '['}{low}, {high}{')' if meta.get('max_exclusive') else ']'}"
    if low is not None:
        return f"{'>' if meta.get('min_exclusive') else '>='} {low}"
    return f"{'<' if meta.get('max_exclusive') else '<='} {high}"


def check_field(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Check one value against its field's metadata (see schema.py); raise ConfigError naming ``key``."""
    if value is None:
        return
    choices = meta.get("choices", ())
    bounded = "min" in meta or "max" in meta
    if choices or bounded:
        # bool == int in Python: True must not pass for 1.
        in_choices = any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices)
        if not in_choices and not (bounded and _within(value, meta)):
            if not bounded:
                problem = f"choose one of {', '.join(map(str, choices))}"
            elif choices:
                problem = f"give {' or '.join(map(str, choices))} or a number {_describe_bounds(meta)}"
            else:
                problem = f"it must be {_describe_bounds(meta)}"
            hint = f" ({meta['hint']})" if meta.get("hint") else ""
            raise ConfigError(f"{key}={value!r} is not valid; {problem}{hint}")
    if "check" in meta:
        meta["check"](key, value)


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every field of a dataclass tree against its metadata; ``prefix`` starts each key."""
    for key, f, value in iter_fields(obj, prefix):
        check_field(key, value, f.metadata)


def check_objective(objective: str, sampler: str, source: str) -> None:
    """Refuse a sampler of the other objective; ``source`` says where the objective came from
    (``diffusion.objective``, or the export being sampled)."""
    allowed = FLOW_SAMPLERS if objective == "flow" else DDPM_SAMPLERS
    if sampler not in allowed:
        raise ConfigError(
            f"sampling.sampler={sampler} samples {'flow' if sampler in FLOW_SAMPLERS else 'DDPM'} models, but "
            f"{source} is {objective}; set sampling.sampler to one of {', '.join(allowed)}"
        )


def validate_config(cfg: Config) -> None:
    check_fields(cfg)
    _cross_field_checks(cfg)


def _cross_field_checks(cfg: Config) -> None:
    """Rules that relate several fields (each field's own rule sits on it in schema.py)."""
    diffusion, data, train = cfg.diffusion, cfg.data, cfg.train
    timesteps = diffusion.timesteps
    sampling = timesteps.sampling or timesteps.name
    weighting = timesteps.weighting or timesteps.name
    if weighting in ("loss_aware", "progress") and sampling != weighting:
        raise ConfigError(
            f"diffusion.timesteps: weighting '{weighting}' needs diffusion.timesteps.sampling='{weighting}' (its "
            f"importance weights assume its own pmf); got sampling {sampling!r}"
        )
    if "speed" in (sampling, weighting) and timesteps.speed.tau > diffusion.num_timesteps:
        raise ConfigError(
            f"diffusion.timesteps.speed.tau={timesteps.speed.tau} is not valid; it must be at most "
            f"diffusion.num_timesteps={diffusion.num_timesteps}"
        )

    if data.format not in ("digits", "patches") and not data.uri:
        raise ConfigError(f"data.uri is empty; data.format={data.format} needs a local path or s3:// URI")
    if data.format == "latents" and data.resolution % 8:
        raise ConfigError(f"data.resolution={data.resolution} must be a multiple of 8 for latents")

    if diffusion.objective == "flow" and cfg.model.learn_sigma:
        fix = "model.learn_sigma=false"
        if cfg.sampling.sampler not in FLOW_SAMPLERS:
            fix += f" and sampling.sampler to one of {', '.join(FLOW_SAMPLERS)}"
        raise ConfigError(
            f"diffusion.objective=flow predicts the velocity only, so model.learn_sigma=true does not fit; set {fix}"
        )
    check_objective(diffusion.objective, cfg.sampling.sampler, "diffusion.objective")
    if cfg.sampling.sampler in DDPM_SAMPLERS and not 1 <= cfg.sampling.steps <= diffusion.num_timesteps:
        raise ConfigError(
            f"sampling.steps={cfg.sampling.steps} must be between 1 and diffusion.num_timesteps="
            f"{diffusion.num_timesteps}"
        )
    for label in cfg.sample.classes:
        if not 0 <= label < cfg.model.num_classes:
            raise ConfigError(
                f"sample.classes contains {label}, outside [0, model.num_classes={cfg.model.num_classes})"
            )
    from speed.models.registry import check_training_options  # torch + timm: only when validating

    check_training_options(cfg.model, cfg.repa, data)

    _, high = num_workers_range(cfg.ray)
    if train.global_batch_size < high:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} cannot be split over "
            f"ray.num_workers={cfg.ray.num_workers} (up to {high} workers need at least one sample each); "
            "raise the batch or lower the worker count"
        )

    if cfg.tune.search_space:
        known = set(dotted_keys(Config()))
        for key in cfg.tune.search_space:
            if key not in known and key != "cell":  # "cell": a bundle of keys (speed.experiments.cells)
                close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"tune.search_space names unknown config key '{key}'{hint}")
