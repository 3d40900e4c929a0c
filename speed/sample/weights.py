"""Which weights a sampling job uses: an export folder or a safetensors file, never a pickle."""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Optional, Tuple

import torch

from speed import storage
from speed.config.schema import ConfigError, StorageConfig
from speed.train.export import (
    DESCRIPTION_NAME,
    METADATA_KEY,
    WEIGHTS_NAME,
    ModelDescription,
    WeightsError,
    load_export,
)

_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
# A safetensors header is JSON; anything claiming more than this is not one.
_MAX_HEADER_BYTES = 100 << 20


def parent_uri(uri: str) -> str:
    """The folder or prefix holding ``uri``."""
    if storage.is_s3(uri):
        return posixpath.dirname(str(uri).rstrip("/"))
    return str(Path(str(uri).removeprefix("file://")).parent)


def resolve_weights_uri(uri: Optional[str], storage_cfg: Optional[StorageConfig] = None, *,
                        key: str = "inference.checkpoint_uri") -> str:
    """The safetensors file behind ``uri`` (an export folder or the file itself), with clear errors."""
    if not uri:
        raise ConfigError(
            f"{key} is not set; give an export folder (ema.safetensors + model.json), a .safetensors file, or "
            "an official DiT checkpoint converted with python -m ray_jobs.convert_dit"
        )
    uri = str(uri)
    if uri.endswith(_PICKLE_SUFFIXES):
        raise WeightsError(
            f"{key}: '{uri}' is a pickle checkpoint, which can run code when loaded; convert it first: "
            f"python -m ray_jobs.convert_dit {uri} DST_FOLDER --model DiT-XL/2 --image-size 256, then set {key}=DST_FOLDER"
        )
    if storage.is_dir(uri, storage_cfg):
        weights = storage.join(uri, WEIGHTS_NAME)
        if storage.exists(weights, storage_cfg):
            return weights
        raise WeightsError(
            f"{key}: folder '{uri}' has no {WEIGHTS_NAME}; point it at an export folder (written at the end of "
            "training, or by python -m ray_jobs.convert_dit) or directly at a .safetensors file"
        )
    if not storage.exists(uri, storage_cfg):
        raise WeightsError(f"{key}: '{uri}' does not exist; fix the path or URI")
    return uri


def read_description(uri: str, storage_cfg: Optional[StorageConfig] = None, *,
                     key: str = "inference.checkpoint_uri") -> ModelDescription:
    """The model description of an export without reading its weights (only the safetensors header)."""
    weights_uri = resolve_weights_uri(uri, storage_cfg, key=key)
    fs, path = storage.filesystem(weights_uri, storage_cfg)
    try:
        with fs.open_input_file(path) as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if not 0 < header_len <= _MAX_HEADER_BYTES:
                raise ValueError("bad header length")
            header = json.loads(handle.read(header_len))
    except (ValueError, UnicodeDecodeError):
        raise WeightsError(
            f"{key}: '{weights_uri}' is not a safetensors file; exports and converted checkpoints must be "
            "safetensors (convert DiT .pt files with python -m ray_jobs.convert_dit)"
        ) from None
    text = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if text is None:
        sibling = storage.join(parent_uri(weights_uri), DESCRIPTION_NAME)
        if not storage.exists(sibling, storage_cfg):
            raise WeightsError(f"{key}: '{weights_uri}' carries no model description and no {DESCRIPTION_NAME} beside it")
        text = storage.read_text(sibling, storage_cfg)
    return ModelDescription.from_json(text)


def load_sampling_model(uri: str, storage_cfg: Optional[StorageConfig] = None, *,
                        key: str = "inference.checkpoint_uri",
                        device: Optional[torch.device] = None) -> Tuple[torch.nn.Module, ModelDescription]:
    """The EMA DiT of an export or of a training checkpoint (eval mode, frozen) and its description."""
    from speed.train.checkpoint import is_training_checkpoint, load_ema_model

    if uri and is_training_checkpoint(str(uri), storage_cfg):
        return load_ema_model(str(uri), storage_cfg, key=key, device=device)
    weights_uri = resolve_weights_uri(uri, storage_cfg, key=key)
    return load_export(weights_uri, storage_cfg, key=key, device=device)
