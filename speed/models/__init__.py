"""Diffusion transformer backbones."""

from speed.models.dit import DiT
from speed.models.registry import DIT_PRESETS, build_dit, count_parameters, list_presets

__all__ = ["DiT", "build_dit", "DIT_PRESETS", "list_presets", "count_parameters"]
