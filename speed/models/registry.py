"""Named DiT sizes ("DiT-XL/2" = XL backbone, 2x2 patches) and a validated builder."""

import difflib
from typing import Any, Dict, List

import torch.nn as nn

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
