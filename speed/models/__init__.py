"""Diffusion transformer backbones."""

from speed.models.dit import DiT
from speed.models.registry import (
    DIT_PRESETS,
    ModelDescription,
    build_dit,
    build_model,
    count_parameters,
    describe,
    list_presets,
    model_geometry,
    preset_summary,
)

__all__ = ["DiT", "build_dit", "build_model", "describe", "model_geometry", "ModelDescription", "DIT_PRESETS",
           "list_presets", "preset_summary", "count_parameters"]
