"""Exported weights: one safetensors file of EMA weights plus the model description beside it.

Layout of an export folder (local or s3://):
  ema.safetensors   DiT state dict (fp32, DiT's key names); the JSON description is also stored in
                    the safetensors metadata under "speed", so the file alone is enough
  model.json        the same description, for people and tools

The description holds what is needed to rebuild and use the model: the model section, the input
size and channels, the data format (pixels or latents, and the latent scale) and the diffusion
schedule. safetensors holds no code, so loading an export can never run a pickle.
"""

from __future__ import annotations

import json
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from speed import storage
from speed.config.schema import StorageConfig
from speed.models.registry import ModelDescription

WEIGHTS_NAME = "ema.safetensors"
DESCRIPTION_NAME = "model.json"
METADATA_KEY = "speed"


class WeightsError(ValueError):
    """Weights that cannot be used; the message names the file and what to do."""


def save_export(state_dict: Dict[str, torch.Tensor], description: ModelDescription, uri: str,
                storage_cfg: Optional[StorageConfig] = None) -> str:
    """Write ``ema.safetensors`` and ``model.json`` under folder ``uri``; returns the weights URI."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    blob = save_safetensors_bytes(tensors, metadata={METADATA_KEY: description.to_json()})
    weights_uri = storage.join(uri, WEIGHTS_NAME)
    storage.write_bytes(weights_uri, blob, storage_cfg)
    storage.write_text(storage.join(uri, DESCRIPTION_NAME), description.to_json() + "\n", storage_cfg)
    return weights_uri


def read_weights(uri: str, storage_cfg: Optional[StorageConfig], key: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    if storage.is_dir(uri, storage_cfg):
        uri = storage.join(uri, WEIGHTS_NAME)
    if not storage.exists(uri, storage_cfg):
        raise WeightsError(f"{key}: '{uri}' does not exist; point it at an export folder or its {WEIGHTS_NAME}")
    blob = storage.read_bytes(uri, storage_cfg)
    try:
        tensors = load_safetensors_bytes(blob)
        # The header is an 8-byte little-endian length followed by JSON holding "__metadata__".
        header_len = int.from_bytes(blob[:8], "little")
        metadata = json.loads(blob[8 : 8 + header_len]).get("__metadata__") or {}
    except Exception as exc:  # not a safetensors file: refuse, never fall back to pickle
        raise WeightsError(
            f"{key}: '{uri}' is not a safetensors file ({type(exc).__name__}); exports and converted "
            "checkpoints must be safetensors (convert DiT .pt files with python -m ray_jobs.convert_dit)"
        ) from None
    return tensors, metadata


def load_export(uri: str, storage_cfg: Optional[StorageConfig] = None, *, key: str = "checkpoint_uri",
                device=None) -> Tuple[torch.nn.Module, ModelDescription]:
    """Rebuild the DiT of an export (folder or .safetensors URI) in eval mode, with its description."""
    tensors, metadata = read_weights(uri, storage_cfg, key)
    text = metadata.get(METADATA_KEY)
    if text is None:
        sibling = storage.join(uri if storage.is_dir(uri, storage_cfg) else uri.rsplit("/", 1)[0], DESCRIPTION_NAME)
        if not storage.exists(sibling, storage_cfg):
            raise WeightsError(f"{key}: '{uri}' carries no model description and no {DESCRIPTION_NAME} beside it")
        text = storage.read_text(sibling, storage_cfg)
    description = ModelDescription.from_json(text)
    model = description.build()
    load_state_dict_checked(model, tensors, source=uri, key=key)
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model, description


def load_state_dict_checked(model: torch.nn.Module, tensors: Dict[str, torch.Tensor], *, source: str, key: str) -> None:
    """Load with strict key and shape checks and a message that says which model the file is for."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{name} {tuple(tensors[name].shape)} vs {tuple(expected[name].shape)}"
        for name in expected
        if name in tensors and tensors[name].shape != expected[name].shape
    ]
    if missing or unexpected or mismatched:
        details = []
        if mismatched:
            details.append("shape mismatches: " + "; ".join(mismatched[:3]))
        if missing:
            details.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise WeightsError(
            f"{key}: weights in '{source}' do not fit the configured model ({', '.join(details)}); "
            "use weights trained with the same model.* and data.* settings"
        )
    model.load_state_dict(tensors, strict=True)

