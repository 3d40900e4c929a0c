"""Typed configuration: schema dataclasses (each field with its allowed values), the one loader, and
the validation walk."""

from speed.config.load import (
    DEFAULT_CONFIG,
    all_keys,
    apply_overrides,
    config_from_dict,
    load_config,
    to_dict,
)
from speed.config.schema import Config, ConfigError, num_workers_range

__all__ = [
    "Config",
    "ConfigError",
    "DEFAULT_CONFIG",
    "all_keys",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "num_workers_range",
    "to_dict",
]
