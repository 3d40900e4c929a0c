"""Named DiT sizes ("DiT-XL/2" = XL backbone, 2x2 patches), the one place a DiT is built from
config (``build_model``), and the model description that travels with weights.

Presets (``preset_summary`` says what each holds):
  DiT-<size>/<patch>           the exact DiT: LayerNorm, GELU MLP, no QK-norm, sin-cos positions
  LightningDiT-<size>/<patch>  the same backbone with LightningDiT's blocks: RMSNorm, SwiGLU,
                               QK-norm, 2-D RoPE (speed.models.blocks)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from speed.config.schema import ConfigError, DataConfig, DiffusionConfig, ModelConfig, RepaConfig
from speed.models.blocks import BlockOptions
from speed.models.dit import DiT
from speed.models.routing import resolve_span

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
    "D": (2, 4),
    "N": (2, 1),
}

# LightningDiT's block changes (Yao et al. 2025) on DiT's backbones.
LIGHTNING_BLOCKS: Dict[str, Any] = dict(norm="rmsnorm", mlp="swiglu", qk_norm=True, pos_embed="rope2d")
_LIGHTNING_PATCH_SIZES: Dict[str, tuple] = {"S": (1, 2), "B": (1, 2), "L": (1, 2), "XL": (1, 2), "T": (2,), "D": (2,),
                                            "N": (2,)}
BLOCK_OPTION_FIELDS = ("norm", "mlp", "qk_norm", "pos_embed")

# name -> dict(depth, hidden_size, num_heads, patch_size[, block options]); a preset without block
# options has DiT's (BlockOptions defaults).
DIT_PRESETS: Dict[str, Dict[str, Any]] = {
    **{
        f"DiT-{size}/{patch}": dict(**_BACKBONES[size], patch_size=patch)
        for size, patches in _PATCH_SIZES.items()
        for patch in patches
    },
    **{
        f"LightningDiT-{size}/{patch}": dict(**_BACKBONES[size], patch_size=patch, **LIGHTNING_BLOCKS)
        for size, patches in _LIGHTNING_PATCH_SIZES.items()
        for patch in patches
    },
}

_OVERRIDABLE = ("depth", "hidden_size", "num_heads", "mlp_ratio", "class_dropout_prob", "patch_size",
                *BLOCK_OPTION_FIELDS)


def list_presets() -> List[str]:
    return list(DIT_PRESETS)


def preset_options(name: str) -> BlockOptions:
    """The block options a preset holds (DiT's unless it names others)."""
    preset = DIT_PRESETS[name]
    return BlockOptions(**{k: preset[k] for k in BLOCK_OPTION_FIELDS if k in preset})


def preset_summary(name: str) -> str:
    """One line saying what a preset holds, e.g. "depth 12, hidden 768, 12 heads, patch 2; layernorm, gelu, ..."."""
    preset, options = DIT_PRESETS[name], preset_options(name)
    return (f"depth {preset['depth']}, hidden {preset['hidden_size']}, {preset['num_heads']} heads, patch "
            f"{preset['patch_size']}; {options.norm}, {options.mlp} MLP, "
            f"{'QK-norm' if options.qk_norm else 'no QK-norm'}, {options.pos_embed} positions")


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
    class_dropout_prob, patch_size, norm, mlp, qk_norm, pos_embed.
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
    # What the network predicts: "ddpm" (eps and sigma) or "flow" (velocity); exports made before
    # flow matching existed are DDPM.
    objective: str = "ddpm"

    @property
    def is_latent(self) -> bool:
        return self.data_format == "latents"

    def model_config(self) -> ModelConfig:
        # Only the architecture travels (routing is train-only); keys of other versions are ignored.
        known = {f.name for f in dataclasses.fields(ModelConfig)} - {"routing"}
        return ModelConfig(**{k: v for k, v in self.model.items() if k in known})

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
        """Older descriptions lack the block options: missing keys mean the preset's (DiT's) blocks."""
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
        model=architecture(model),
        input_size=input_size,
        in_channels=in_channels,
        data_format=data.format,
        resolution=data.resolution,
        latent_scale=data.latent_scale,
        num_timesteps=diffusion.num_timesteps,
        schedule=diffusion.schedule,
        step=step,
        objective=diffusion.objective,
    )


def architecture(model: ModelConfig) -> Dict[str, Any]:
    """The model section as an export records it: the block options resolved (so the export says
    what it holds whatever presets become), the train-only routing left out."""
    fields = {k: v for k, v in dataclasses.asdict(model).items() if k != "routing"}
    options = preset_options(model.name) if model.name in DIT_PRESETS else BlockOptions()
    for key in BLOCK_OPTION_FIELDS:
        if fields.get(key) is None:
            fields[key] = getattr(options, key)
    return fields


def resolved_depth(model: ModelConfig) -> int:
    return model.depth if model.depth is not None else DIT_PRESETS[model.name]["depth"]


def default_repa_block(depth: int) -> int:
    """REPA's choice scaled to the depth: after block 8 of 24-28 (L, XL), 4 of 12 (B), 1 of 2-5."""
    return max(1, min(8, depth // 3))


def repa_block(repa: RepaConfig, depth: int) -> int:
    return repa.block if repa.block is not None else default_repa_block(depth)


def check_training_options(model: ModelConfig, repa: RepaConfig, data: DataConfig) -> None:
    """Config checks of routing and alignment that need the preset's depth (raise ConfigError)."""
    if model.name not in DIT_PRESETS:
        return  # reported by model.name's own check
    depth = resolved_depth(model)
    if model.routing.fraction > 0:
        try:
            resolve_span(model.routing.start_block, model.routing.end_block, depth)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if repa.encoder:
        if not repa.weights_uri:
            raise ConfigError(
                f"repa.encoder={repa.encoder!r} needs repa.weights_uri (safetensors or a weights-only torch file of the "
                "encoder's state dict); nothing is downloaded"
            )
        # On latents the records must carry the clean images (prepare.keep_images=true): that is a
        # property of the data, checked when it is read (speed.data.latents.check_latent_images).
        block = repa_block(repa, depth)
        if not 1 <= block <= depth:
            raise ConfigError(
                f"repa.block={block} is not valid for {model.name} with {depth} blocks; give 1 .. {depth} "
                f"(or leave it unset for {default_repa_block(depth)})"
            )


def build_model(model_cfg: ModelConfig, input_size: int, in_channels: int, device=None) -> nn.Module:
    """The one place a DiT is built from config."""
    overrides = {
        k: getattr(model_cfg, k)
        for k in ("depth", "hidden_size", "num_heads", "mlp_ratio", *BLOCK_OPTION_FIELDS)
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
