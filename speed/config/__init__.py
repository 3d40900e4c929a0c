"""Typed configuration: schema dataclasses, the one loader, and value validation."""

from speed.config.load import (
    DEFAULT_CONFIG,
    all_keys,
    apply_overrides,
    config_from_dict,
    load_config,
    to_dict,
    to_yaml,
)
from speed.config.schema import Config, ConfigError
from speed.config.validate import num_workers_range

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
    "to_yaml",
]
