"""Named DiT sizes ("DiT-XL/2" = XL backbone, 2x2 patches), the one place a DiT is built from
config (``build_model``), and the model description that travels with weights."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from speed.config.schema import DataConfig, DiffusionConfig, ModelConfig
from speed.models.dit import DiT

# Backbone sizes from the DiT paper (Table 1) plus small ones for CPU work: T(iny) for quick
# experiments, D(igits) for the embedded default (minutes on two cores) and N(ano) for unit tests.
_BACKBONES: Dict[str, Dict[str, int]] = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "T": dict(depth=6, hidden_size=192, num_heads=3),
    "D": dict(depth=4, hidden_size=128, num_heads=4),
    "N": dict(depth=2, hidden_size=64, num_heads=2),
}
_PATCH_SIZES: Dict[str, tuple] = {
    "S": (2, 4, 8),
    "B": (2, 4, 8),
    "L": (2, 4, 8),
    "XL": (2, 4, 8),
    "T": (2, 4),
    "D": (2,),
    "N": (2, 1),
}

# name -> dict(depth, hidden_size, num_heads, patch_size)
DIT_PRESETS: Dict[str, Dict[str, int]] = {
    f"DiT-{size}/{patch}": dict(**_BACKBONES[size], patch_size=patch)
    for size, patches in _PATCH_SIZES.items()
    for patch in patches
}

_OVERRIDABLE = ("depth", "hidden_size", "num_heads", "mlp_ratio", "class_dropout_prob", "patch_size")


def list_presets() -> List[str]:
    return list(DIT_PRESETS)


def build_dit(
    name: str,
    input_size: int,
    in_channels: int,
    num_classes: int,
    learn_sigma: bool = True,
    **overrides: Any,
) -> DiT:
    """Build the DiT preset ``name`` for ``input_size`` x ``input_size`` x ``in_channels`` inputs.

    ``overrides`` may replace any of: depth, hidden_size, num_heads, mlp_ratio,
    class_dropout_prob, patch_size.
    """
    if name not in DIT_PRESETS:
        close = difflib.get_close_matches(name, DIT_PRESETS, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"Unknown DiT preset {name!r}.{hint} Valid presets: {', '.join(DIT_PRESETS)}")
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise ValueError(f"Unknown DiT override(s) {unknown}; allowed: {list(_OVERRIDABLE)}")
    config: Dict[str, Any] = {**DIT_PRESETS[name], **overrides}
    # DiT itself also checks these; repeating them here names the preset in the message.
    if input_size % config["patch_size"]:
        raise ValueError(f"{name}: input_size {input_size} is not divisible by patch_size {config['patch_size']}")
    if config["hidden_size"] % config["num_heads"]:
        raise ValueError(
            f"{name}: hidden_size {config['hidden_size']} is not divisible by num_heads {config['num_heads']}"
        )
    return DiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, learn_sigma=learn_sigma, **config)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as DiT's fixed pos_embed are not counted).

    Published DiT counts include pos_embed (a frozen parameter there); add
    ``model.pos_embed.numel()`` to compare.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --- the model of a config, and its description --------------------------------------------------


@dataclass
class ModelDescription:
    """What is needed to rebuild and use a trained DiT; stored with every export and checkpoint."""

    model: Dict[str, Any]  # the ModelConfig fields
    input_size: int  # spatial size the DiT sees (pixels, or latent size = resolution / 8)
    in_channels: int
    data_format: str  # digits | imagefolder | parquet | latents
    resolution: int  # image resolution
    latent_scale: float
    num_timesteps: int
    schedule: str
    step: int = 0

    @property
    def is_latent(self) -> bool:
        return self.data_format == "latents"

    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.model)

    def build(self, device=None) -> nn.Module:
        """A freshly initialised DiT of this description."""
        return build_model(self.model_config(), self.input_size, self.in_channels, device=device)

    def at_step(self, step: int) -> "ModelDescription":
        return dataclasses.replace(self, step=step)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelDescription":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ModelDescription":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def model_geometry(data: DataConfig) -> Tuple[int, int]:
    """(input_size, in_channels) of the DiT for a data section: latents are 8x smaller, 4 channels."""
    if data.format == "latents":
        return data.resolution // 8, 4
    return data.resolution, data.channels


def describe(model: ModelConfig, data: DataConfig, diffusion: DiffusionConfig, step: int = 0) -> ModelDescription:
    input_size, in_channels = model_geometry(data)
    return ModelDescription(
        model=dataclasses.asdict(model),
        input_size=input_size,
        in_channels=in_channels,
        data_format=data.format,
        resolution=data.resolution,
        latent_scale=data.latent_scale,
        num_timesteps=diffusion.num_timesteps,
        schedule=diffusion.schedule,
        step=step,
    )


def build_model(model_cfg: ModelConfig, input_size: int, in_channels: int, device=None) -> nn.Module:
    """The one place a DiT is built from config."""
    overrides = {
        k: getattr(model_cfg, k)
        for k in ("depth", "hidden_size", "num_heads", "mlp_ratio")
        if getattr(model_cfg, k) is not None
    }
    overrides["class_dropout_prob"] = model_cfg.class_dropout_prob
    with torch.device(device or "cpu"):
        return build_dit(
            model_cfg.name,
            input_size=input_size,
            in_channels=in_channels,
            num_classes=model_cfg.num_classes,
            learn_sigma=model_cfg.learn_sigma,
            **overrides,
        )
