"""Representation alignment (REPA, arXiv 2410.06940): an auxiliary loss that aligns the DiT's
hidden states after an early block, through a small projector MLP, with the patch features of a
frozen pretrained encoder that sees the clean image.

  encoder    a timm model named by ``repa.encoder``, built without weights (nothing is
             downloaded) and loaded from ``repa.weights_uri``: safetensors, or a torch file read
             with ``weights_only=True`` (pickles that would run code are refused). The file may
             hold the whole timm state dict (a classifier head is ignored); missing keys are
             refused by name. Frozen and in eval mode; never in the optimizer, never sharded.
  input      the clean image in [-1, 1] (or uint8, as latent records carry it) -> [0, 1], gray
             repeated to the encoder's channels, resized to its resolution, normalised with its
             mean and std
  target     the encoder's patch tokens (prefix tokens dropped), resized to the DiT token grid
             when the grids differ (area average when shrinking, bilinear when growing)
  projector  Linear -> SiLU -> Linear -> SiLU -> Linear (REPA's), hidden size -> encoder width
  loss       per sample: minus the cosine similarity of projection and target, averaged over
             tokens, times ``repa.weight``
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from speed import storage
from speed.config.schema import ConfigError, RepaConfig, StorageConfig
from speed.models.routing import gather_tokens


class RepaProjector(nn.Sequential):
    """REPA's projector: hidden_size -> projector_dim -> projector_dim -> feature_dim."""

    def __init__(self, hidden_size: int, projector_dim: int, feature_dim: int):
        super().__init__(
            nn.Linear(hidden_size, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, feature_dim),
        )


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Minus the cosine similarity per token, averaged over tokens: [N, T, D] x2 -> [N] (float32)."""
    projected = F.normalize(projected.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return -(projected * target).sum(dim=-1).mean(dim=1)


def build_encoder(repa: RepaConfig, device=None) -> nn.Module:
    """The timm model of ``repa.encoder`` with random weights (``pretrained=False``)."""
    import timm

    kwargs = dict(repa.encoder_kwargs)
    kwargs.setdefault("num_classes", 0)  # the patch features are what is used; a head would be dead weight
    try:
        with torch.device(device or "cpu"):
            return timm.create_model(repa.encoder, pretrained=False, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ConfigError(f"repa.encoder={repa.encoder!r} is not a timm model name (e.g. "
                              "vit_base_patch14_dinov2.lvd142m); see timm.list_models()") from None
        raise
    except TypeError as exc:
        raise ConfigError(f"repa.encoder_kwargs={kwargs} do not fit timm model {repa.encoder!r}: {exc}") from None


def read_encoder_weights(uri: str, storage_cfg: Optional[StorageConfig] = None,
                         key: str = "repa.weights_uri") -> Dict[str, torch.Tensor]:
    """A state dict from safetensors or a ``weights_only`` torch file; pickles are refused."""
    from safetensors.torch import load as load_safetensors_bytes

    from speed.models.convert import extract_state_dict, load_torch_checkpoint
    from speed.models.export import WeightsError

    if not storage.exists(uri, storage_cfg):
        raise WeightsError(f"{key}: '{uri}' does not exist; give the encoder's weights (safetensors or a .pt state dict)")
    blob = storage.read_bytes(uri, storage_cfg)
    try:
        tensors = load_safetensors_bytes(blob)
    except Exception:  # not safetensors: a torch file, read with weights_only (refuses code)
        tensors = extract_state_dict(load_torch_checkpoint(uri, storage_cfg, key=key), source=uri, key=key)
    return tensors


def load_encoder_weights(encoder: nn.Module, tensors: Dict[str, torch.Tensor], *, source: str,
                         key: str = "repa.weights_uri") -> None:
    """Load every tensor the encoder has; unused ones (a classifier head) are ignored, missing
    ones and shape mismatches refused by name."""
    from speed.models.export import WeightsError

    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise WeightsError(
            f"{key}: '{source}' lacks {len(missing)} tensor(s) of the encoder ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); give the timm state dict of repa.encoder, built with the same "
            "repa.encoder_kwargs"
        )
    mismatched = [f"{name} {tuple(tensors[name].shape)} vs {tuple(value.shape)}" for name, value in expected.items()
                  if tuple(tensors[name].shape) != tuple(value.shape)]
    if mismatched:
        raise WeightsError(f"{key}: '{source}' does not fit repa.encoder ({'; '.join(mismatched[:3])}); check "
                           "repa.encoder and repa.encoder_kwargs")
    encoder.load_state_dict({name: tensors[name] for name in expected}, strict=True)


def encoder_resolution(encoder: nn.Module, repa: RepaConfig) -> int:
    if repa.resolution is not None:
        return repa.resolution
    patch_embed = getattr(encoder, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is not None:
        return int(size[0] if isinstance(size, Sequence) else size)
    return int(encoder.pretrained_cfg.get("input_size", (3, 224, 224))[-1])


class RepaAligner:
    """The frozen encoder, the (trainable) projector and the loss of one training run.

    Not an ``nn.Module``: the encoder must stay out of the model, the optimizer and any wrapper;
    only ``projector`` is trained (the trainer may replace it by its FSDP/DDP-wrapped self).
    """

    def __init__(self, encoder: nn.Module, projector: nn.Module, *, block: int, weight: float, resolution: int,
                 token_grid: Tuple[int, int]):
        self.encoder = encoder.requires_grad_(False).eval()
        self.projector = projector
        self.block = block
        self.weight = float(weight)
        self.resolution = resolution
        self.token_grid = tuple(token_grid)
        config = getattr(encoder, "pretrained_cfg", None) or {}
        proj = getattr(getattr(encoder, "patch_embed", None), "proj", None)
        self.in_chans = proj.in_channels if isinstance(proj, nn.Conv2d) else 3
        self.mean = torch.tensor(config.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(config.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32).view(1, -1, 1, 1)
        self.prefix_tokens = int(getattr(encoder, "num_prefix_tokens", 0))

    @classmethod
    def build(cls, repa: RepaConfig, *, hidden_size: int, block: int, token_grid: Tuple[int, int],
              storage_cfg: Optional[StorageConfig] = None, load_weights: bool = True, device=None) -> "RepaAligner":
        """From the ``repa`` section. ``load_weights=False`` (e.g. on the meta device, to count
        FLOPs) skips reading ``repa.weights_uri``."""
        encoder = build_encoder(repa, device=device)
        if load_weights:
            load_encoder_weights(encoder, read_encoder_weights(repa.weights_uri, storage_cfg), source=repa.weights_uri)
        with torch.device(device or "cpu"):
            projector = RepaProjector(hidden_size, repa.projector_dim, int(encoder.num_features))
        return cls(encoder, projector, block=block, weight=repa.weight, resolution=encoder_resolution(encoder, repa),
                   token_grid=token_grid)

    def to(self, device) -> "RepaAligner":
        self.encoder.to(device)
        self.projector.to(device)
        return self

    def encoder_input(self, images: torch.Tensor) -> torch.Tensor:
        """Clean images [N, C, H, W] in [-1, 1] (or uint8 in [0, 255]) -> the encoder's input
        [N, 3, R, R], normalised."""
        x = images.float() / 255 if images.dtype == torch.uint8 else (images.float() + 1) / 2
        if x.shape[1] == 1 and self.in_chans != 1:
            x = x.expand(-1, self.in_chans, -1, -1)  # gray -> RGB
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def target(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's patch features of the clean ``images``, on the DiT token grid: [N, T, D_enc]."""
        x = self.encoder_input(images)
        try:
            # bf16 on GPU, as REPA's mixed-precision training runs it; fp32 elsewhere.
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
                features = self.encoder.forward_features(x)
        except (AssertionError, RuntimeError) as exc:
            raise ConfigError(
                f"repa: the encoder does not take {self.resolution}x{self.resolution} inputs ({exc}); set "
                "repa.resolution to its training size, or repa.encoder_kwargs.dynamic_img_size=true (ViTs)"
            ) from None
        return self.features_on_grid(features)

    def features_on_grid(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder output ([N, prefix + t, D] tokens or [N, D, h, w] maps) -> [N, T, D] on the DiT grid."""
        if features.ndim == 4:
            grid = features.float()  # [N, D, h, w]
        else:
            tokens = features[:, self.prefix_tokens:].float()  # [N, t, D]
            side = math.isqrt(tokens.shape[1])
            if side * side != tokens.shape[1]:
                raise ValueError(f"repa: the encoder gives {tokens.shape[1]} patch tokens, not a square grid")
            grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)  # [N, D, h, w]
        if tuple(grid.shape[-2:]) != self.token_grid:
            # Down: average the patches each token covers; up: interpolate between patches.
            shrink = grid.shape[-2] >= self.token_grid[0] and grid.shape[-1] >= self.token_grid[1]
            grid = F.interpolate(grid, size=self.token_grid, mode="area") if shrink else F.interpolate(
                grid, size=self.token_grid, mode="bilinear", align_corners=False)
        return grid.flatten(2).transpose(1, 2)  # [N, T, D]

    def loss(self, hidden: torch.Tensor, target: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``weight`` x alignment loss per sample [N]; ``keep`` [N, K]: hidden holds only these tokens
        (the aligned block lies inside the routed span)."""
        if keep is not None:
            target = gather_tokens(target, keep)
        return self.weight * alignment_loss(self.projector(hidden), target)
