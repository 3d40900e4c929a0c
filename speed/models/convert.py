"""Convert official DiT checkpoints (facebookresearch/DiT ``.pt`` files) to a safetensors export.

The published files (e.g. DiT-XL-2-256x256.pt) are pickled state dicts; DiT's train.py
checkpoints wrap them as {"model", "ema", "opt", "args"}. They are read with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers and refuses
anything whose unpickling would run code; ``argparse.Namespace`` (train.py's "args") is the one
extra type allowed. Our DiT keeps DiT's parameter names, so the state dict loads strictly and the
published weights reproduce DiT's samples.
"""

from __future__ import annotations

import argparse
import io
import pickle
from typing import Dict, Optional, Tuple

import torch

from speed import storage
from speed.config.schema import ModelConfig, StorageConfig
from speed.models.registry import ModelDescription, architecture, build_model
from speed.models.export import WeightsError, save_export

# What DiT's published checkpoints were trained with (ImageNet, SD-VAE latents, 1000 linear steps).
DIT_NUM_CLASSES = 1000
DIT_LATENT_SCALE = 0.18215
DIT_LATENT_CHANNELS = 4
DIT_VAE_DOWNSAMPLE = 8


class UnsafeCheckpointError(WeightsError):
    """A checkpoint whose unpickling would need code beyond tensors and plain containers."""


def load_torch_checkpoint(uri: str, storage_cfg: Optional[StorageConfig] = None, *, key: str = "SRC") -> object:
    """``torch.load(weights_only=True)`` of a local or s3:// file, with a clear refusal for unsafe pickles."""
    if not storage.exists(uri, storage_cfg):
        raise WeightsError(f"{key}: '{uri}' does not exist")
    blob = storage.read_bytes(uri, storage_cfg)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{key}: refusing to load '{uri}': it is not a plain tensor checkpoint, and unpickling it could run "
            f"code ({unsafe_pickle_reason(exc)}). Only state dicts of tensors are accepted; re-save the weights with "
            "torch.save(model.state_dict(), path) from a trusted environment"
        ) from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise WeightsError(f"{key}: '{uri}' is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None


def unsafe_pickle_reason(exc: BaseException) -> str:
    """The line of torch's weights_only refusal that names the offending global (not its advice to
    retry with weights_only=False, which is exactly what must not happen)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line
    return type(exc).__name__


def extract_state_dict(checkpoint: object, *, source: str, key: str = "SRC") -> Dict[str, torch.Tensor]:
    """The EMA weights of a DiT checkpoint: the dict itself, or its "ema" (then "model") entry."""
    if isinstance(checkpoint, dict):
        for wrapper in ("ema", "model", "state_dict"):
            if wrapper in checkpoint and isinstance(checkpoint[wrapper], dict):
                checkpoint = checkpoint[wrapper]
                break
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise WeightsError(f"{key}: '{source}' holds no state dict (expected {{name: tensor}} or {{'ema': ...}})")
    tensors = {}
    for name, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{key}: '{source}' entry '{name}' is a {type(value).__name__}, not a tensor")
        # DDP-saved weights carry a "module." prefix; DiT's own files do not.
        tensors[name.removeprefix("module.")] = value.detach().to(torch.float32).contiguous()
    return tensors


def dit_description(model_name: str, image_size: int, num_classes: int = DIT_NUM_CLASSES,
                    learn_sigma: bool = True) -> ModelDescription:
    """The export description of an official latent-space DiT."""
    if image_size % DIT_VAE_DOWNSAMPLE:
        raise ValueError(f"--image-size {image_size} must be a multiple of {DIT_VAE_DOWNSAMPLE} (SD-VAE latents)")
    model_cfg = ModelConfig(name=model_name, num_classes=num_classes, learn_sigma=learn_sigma, class_dropout_prob=0.1)
    return ModelDescription(
        model=architecture(model_cfg),
        input_size=image_size // DIT_VAE_DOWNSAMPLE,
        in_channels=DIT_LATENT_CHANNELS,
        data_format="latents",
        resolution=image_size,
        latent_scale=DIT_LATENT_SCALE,
        num_timesteps=1000,
        schedule="linear",
        step=0,
    )


def convert_dit_checkpoint(src_uri: str, dst_uri: str, model_name: str = "DiT-XL/2", image_size: int = 256,
                           num_classes: int = DIT_NUM_CLASSES, storage_cfg: Optional[StorageConfig] = None,
                           ) -> Tuple[str, ModelDescription]:
    """Read a DiT ``.pt``, check it fits ``model_name`` at ``image_size``, write an export folder."""
    description = dit_description(model_name, image_size, num_classes)
    tensors = extract_state_dict(load_torch_checkpoint(src_uri, storage_cfg), source=src_uri)
    # Shapes only: a meta-device model checks names and shapes without allocating DiT-XL's weights.
    model = build_model(description.model_config(), description.input_size, description.in_channels, device="meta")
    _check_fits(model, tensors, src_uri, model_name, image_size)
    weights_uri = save_export(tensors, description, dst_uri, storage_cfg)
    return weights_uri, description


def _check_fits(model: torch.nn.Module, tensors: Dict[str, torch.Tensor], source: str, model_name: str,
                image_size: int) -> None:
    expected = model.state_dict()
    problems = sorted(set(expected) ^ set(tensors)) + [
        name for name in expected if name in tensors and tuple(tensors[name].shape) != tuple(expected[name].shape)
    ]
    if problems:
        raise WeightsError(
            f"SRC: '{source}' does not fit {model_name} at --image-size {image_size} (e.g. '{problems[0]}'); "
            "pass the --model and --image-size the checkpoint was trained with (DiT-XL-2-256x256.pt: "
            "--model DiT-XL/2 --image-size 256)"
        )


__all__ = [
    "UnsafeCheckpointError",
    "convert_dit_checkpoint",
    "dit_description",
    "extract_state_dict",
    "load_torch_checkpoint",
    "unsafe_pickle_reason",
]
