"""Block options of the DiT: normalisation, MLP, QK-norm and position embedding.

The defaults build DiT's own layers (timm's ``Attention`` and ``Mlp``, LayerNorm without affine
parameters, fixed 2-D sin-cos embedding), so the default model keeps DiT's parameter names and
loads official checkpoints. The options are LightningDiT's block changes, taken from timm:

  norm=rmsnorm      timm ``RmsNorm`` (no affine: adaLN's shift/scale take its place, as for LayerNorm)
  mlp=swiglu        timm ``SwiGLU`` with 2/3 of the GELU MLP's hidden width (same parameter count)
  qk_norm=true      per-head normalisation of queries and keys (the block's norm kind, affine)
  pos_embed=rope2d  axial 2-D rotary embedding of the token grid (timm ``RotaryEmbeddingCat``) in
                    every attention layer, instead of the absolute sin-cos embedding
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import AttentionRope, Mlp, RmsNorm, RotaryEmbeddingCat, SwiGLU
from timm.models.vision_transformer import Attention

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POS_EMBEDS = ("sincos", "rope2d")


@dataclass(frozen=True)
class BlockOptions:
    """The block choices of one model; the defaults are DiT's."""

    norm: str = "layernorm"
    mlp: str = "gelu"
    qk_norm: bool = False
    pos_embed: str = "sincos"

    def __post_init__(self) -> None:
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("pos_embed", POS_EMBEDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}={getattr(self, name)!r} is not valid; choose one of {', '.join(allowed)}")

    @property
    def uses_rope(self) -> bool:
        return self.pos_embed == "rope2d"


def make_norm(kind: str, dim: int) -> nn.Module:
    """The norm before a modulated branch: no affine parameters (adaLN supplies shift and scale)."""
    if kind == "rmsnorm":
        return RmsNorm(dim, eps=1e-6, affine=False)
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def make_mlp(kind: str, dim: int, mlp_ratio: float) -> nn.Module:
    hidden = int(dim * mlp_ratio)
    if kind == "swiglu":
        # Two input projections instead of one: 2/3 of the width keeps the parameter count (LightningDiT).
        return SwiGLU(in_features=dim, hidden_features=int(2 * hidden / 3), act_layer=nn.SiLU)
    approx_gelu = functools.partial(nn.GELU, approximate="tanh")
    return Mlp(in_features=dim, hidden_features=hidden, act_layer=approx_gelu, drop=0)


def make_attention(dim: int, num_heads: int, options: BlockOptions) -> nn.Module:
    """DiT's timm ``Attention`` unless an option needs timm's ``AttentionRope``; both name their
    weights ``qkv`` and ``proj`` (and ``q_norm`` / ``k_norm`` when normalised)."""
    if not options.qk_norm and not options.uses_rope:
        return Attention(dim, num_heads=num_heads, qkv_bias=True)
    qk_norm_layer = RmsNorm if options.norm == "rmsnorm" else nn.LayerNorm
    return AttentionRope(dim, num_heads=num_heads, qkv_bias=True, num_prefix_tokens=0, qk_norm=options.qk_norm,
                         norm_layer=qk_norm_layer)


class Rope2D(nn.Module):
    """The rotary table of a token grid: [T, 2 * head_dim] (sin | cos), tokens in row-major order.

    A non-persistent buffer: it is a pure function of the grid, so state dicts do not carry it and
    ``reset`` (called by ``DiT.initialize_weights``) refills it after a meta-device build.
    """

    def __init__(self, head_dim: int, grid: Tuple[int, int]):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"model.pos_embed=rope2d needs hidden_size / num_heads divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.grid = tuple(grid)
        self.register_buffer("table", torch.zeros(grid[0] * grid[1], 2 * head_dim), persistent=False)

    def reset(self) -> None:
        if self.table.is_meta:
            return
        rope = RotaryEmbeddingCat(self.head_dim, in_pixels=False, feat_shape=list(self.grid), device="cpu")
        with torch.no_grad():
            self.table.copy_(rope.get_embed().to(torch.float32))

    def embed(self, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[T, 2 hd] for every token, or [N, 1, K, 2 hd] for the kept tokens ``keep`` [N, K] (routing)."""
        if keep is None:
            return self.table
        return self.table[keep].unsqueeze(1)  # [N, 1, K, 2 hd]: broadcast over heads
