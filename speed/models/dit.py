"""Class-conditional Diffusion Transformer (DiT, Peebles & Xie 2023).

A latent (or pixel) image is cut into patches, each patch becomes a token, and
a stack of transformer blocks conditioned on (timestep, class) through
adaptive LayerNorm with zero-initialised gates ("adaLN-Zero") predicts the
noise (and, with ``learn_sigma``, the per-pixel variance interpolation).

Parameter and buffer names follow the reference implementation so published
DiT checkpoints load with ``strict=True``. The block options (``speed.models.blocks``) and token
routing (``speed.models.routing``, training only) are off by default, which is exactly DiT.
"""

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import PatchEmbed

from speed.models.blocks import BlockOptions, Rope2D, make_attention, make_mlp, make_norm
from speed.models.routing import Route, gather_tokens, scatter_tokens


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x [N, T, D]; shift/scale [N, D] broadcast over tokens.
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                 Embedding layers for timesteps and class labels               #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps: sinusoidal frequencies followed by a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal embedding of (possibly fractional) timesteps t [N] -> [N, dim], float32."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )  # [half]
        # Always float32: bf16 cannot even represent every integer timestep below 1000.
        args = t.float()[:, None] * freqs[None]  # [N, half]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [N, 2*half]
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # [N, dim]
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # [N, F]
        # Match the weights' dtype so a bf16-cast model (e.g. FSDP mixed precision) works without autocast.
        t_freq = t_freq.to(self.mlp[0].weight.dtype)
        return self.mlp(t_freq)  # [N, D]


class LabelEmbedder(nn.Module):
    """Embeds class labels; drops labels to a learned "null" class for classifier-free guidance.

    The null class has index ``num_classes`` and exists only when ``dropout_prob > 0``.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.has_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null_class), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def draw_drop_mask(
        self, batch_size: int, device: Union[torch.device, str, None] = None, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Bernoulli(dropout_prob) mask [N] (True = use the null class).

        Pass a seeded ``generator`` (on ``device``) to make the draw reproducible across workers.
        """
        return torch.rand(batch_size, device=device, generator=generator) < self.dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = self.draw_drop_mask(labels.shape[0], device=labels.device)  # [N]
        else:
            drop_ids = force_drop_ids.to(device=labels.device) == 1  # [N], accepts bool or 0/1 ints
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)  # [N]

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Without a null class there is nothing to drop to, so an explicit mask is ignored
        # (a caller drawing masks with probability 0 gets all-False masks anyway).
        if self.has_null_class and (train or force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)  # [N]
        return self.embedding_table(labels)  # [N, D]


#################################################################################
#                                 Core DiT model                                #
#################################################################################


class DiTBlock(nn.Module):
    """Transformer block whose norms are modulated by the conditioning (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 options: Optional[BlockOptions] = None):
        super().__init__()
        options = options or BlockOptions()
        # No affine params: the per-sample shift/scale from the conditioning take their place.
        self.norm1 = make_norm(options.norm, hidden_size)
        self.attn = make_attention(hidden_size, num_heads, options)
        self.norm2 = make_norm(options.norm, hidden_size)
        self.mlp = make_mlp(options.mlp, hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [N, T, D], c [N, D]; rope: the rotary table of x's tokens (pos_embed=rope2d only)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x [N, D]
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # [N, T, D]
        h = self.attn(h) if rope is None else self.attn(h, rope=rope)
        x = x + gate_msa.unsqueeze(1) * h  # [N, T, D]
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # [N, T, D]
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map from each token to its patch of output pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: str = "layernorm"):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x [N, D]
        x = modulate(self.norm_final(x), shift, scale)  # [N, T, D]
        return self.linear(x)  # [N, T, p*p*C_out]


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    forward(x [N, C, H, W], t [N], y [N]) -> [N, out_channels, H, W] where
    out_channels = 2 * in_channels when ``learn_sigma`` (noise and variance), else in_channels.
    """

    def __init__(
        self,
        input_size: Union[int, Tuple[int, int]] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        norm: str = "layernorm",
        mlp: str = "gelu",
        qk_norm: bool = False,
        pos_embed: str = "sincos",
    ):
        super().__init__()
        options = BlockOptions(norm=norm, mlp=mlp, qk_norm=qk_norm, pos_embed=pos_embed)
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if height % patch_size or width % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if hidden_size % 4:
            # The 2D sin-cos position embedding splits D into (h, w) halves of sin/cos pairs.
            raise ValueError(f"hidden_size {hidden_size} must be divisible by 4")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.input_size = (height, width)
        self.options = options

        self.x_embedder = PatchEmbed((height, width), patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        if options.uses_rope:
            # Relative positions in every attention layer replace the absolute embedding.
            self.pos_embed = None
            self.rope = Rope2D(hidden_size // num_heads, self.x_embedder.grid_size)
        else:
            # Fixed sin-cos embedding, filled in initialize_weights. A persistent buffer (not a
            # parameter) keeps it out of the optimiser and FSDP sharding while still saving/loading
            # it as "pos_embed" like DiT.
            self.register_buffer("pos_embed", torch.zeros(1, self.x_embedder.num_patches, hidden_size))  # [1, T, D]
            self.rope = None

        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, options=options) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm=options.norm)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        # Filled here, not in __init__, so a meta-device model materialised with to_empty()
        # is fully initialised by calling this method.
        grid_h, grid_w = self.x_embedder.grid_size
        if self.pos_embed is not None:
            with torch.no_grad():
                self.pos_embed.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_h, grid_w).unsqueeze(0))
        if self.rope is not None:
            self.rope.reset()

        # Patch embedding is a linear map on flattened patches; initialise it like one.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every residual branch starts as identity and the output as exactly zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, p*p*C] -> [N, C, H, W]."""
        c = self.out_channels
        p = self.patch_size
        h, w = self.x_embedder.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)  # [N, h, w, p, p, C]
        x = torch.einsum("nhwpqc->nchpwq", x)  # [N, C, h, p, w, p]
        return x.reshape(x.shape[0], c, h * p, w * p)  # [N, C, H, W]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        drop_mask: Optional[torch.Tensor] = None,
        route: Optional[Route] = None,
        capture_block: Optional[int] = None,
    ):
        """
        x: [N, C, H, W] noisy images or latents
        t: [N] diffusion timesteps (int or float)
        y: [N] class labels
        drop_mask: optional [N] bool, True = replace the label by the null class. Given
            explicitly it applies in train and eval mode; when None, training draws one with
            ``torch.rand`` on the labels' device (see ``LabelEmbedder.draw_drop_mask`` for a
            generator-driven, reproducible draw).
        route: token routing (``speed.models.routing``); applied in training mode only, so
            evaluation and sampling always use every token.
        capture_block: also return the hidden states after this many blocks (REPA): then the
            result is (output, hidden [N, T', D], keep) where keep [N, T'] are the token indices
            of hidden when it lies inside the routed span, else None (every token, T' = T).

        Returns [N, C_out, H, W], or the triple above.
        """
        x = self.x_embedder(x)  # [N, T, D]
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)
        t = self.t_embedder(t)  # [N, D]
        y = self.y_embedder(y, self.training, force_drop_ids=drop_mask)  # [N, D]
        c = t + y  # [N, D]
        routed = route is not None and self.training
        rope = self.rope.embed() if self.rope is not None else None
        full, keep, hidden, hidden_keep = x, None, None, None
        for index in range(len(self.blocks) + 1):
            if routed and index == route.end:
                x, keep = scatter_tokens(full, x, route.keep), None  # the waiting tokens rejoin
                rope = self.rope.embed() if self.rope is not None else None
            if index == capture_block:
                hidden, hidden_keep = x, keep
            if index == len(self.blocks):
                break
            if routed and index == route.start:
                full, keep = x, route.keep
                x = gather_tokens(x, keep)  # [N, K, D]
                rope = self.rope.embed(keep) if self.rope is not None else None
            x = self.blocks[index](x, c) if rope is None else self.blocks[index](x, c, rope)  # [N, T or K, D]
        x = self.final_layer(x, c)  # [N, T, p*p*C_out]
        out = self.unpatchify(x)  # [N, C_out, H, W]
        if capture_block is not None:
            return out, hidden, hidden_keep
        return out


#################################################################################
#                         Fixed 2D sin-cos position embedding                   #
#################################################################################


def get_1d_sincos_pos_embed(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """positions [M] -> [M, embed_dim] as [sin(pos * w_k), cos(pos * w_k)]."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    out = positions.double()[:, None] * omega[None]  # [M, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # [M, D]


def get_2d_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """[grid_h * grid_w, embed_dim] float32, tokens in row-major order.

    Same layout as the reference (MAE/DiT) numpy code: first half encodes the column,
    second half the row, so published checkpoints' pos_embed match ours exactly.
    """
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )  # [h, w] each
    emb_col = get_1d_sincos_pos_embed(embed_dim // 2, cols.reshape(-1))  # [T, D/2]
    emb_row = get_1d_sincos_pos_embed(embed_dim // 2, rows.reshape(-1))  # [T, D/2]
    return torch.cat([emb_col, emb_row], dim=1).float()  # [T, D]
