"""The image autoencoder (diffusers' AutoencoderKL, e.g. stabilityai/sd-vae-ft-ema): load it safely
from any URI, encode images to posterior mean/std, decode latents back to images.

``vae.path`` is a diffusers folder (config.json + diffusion_pytorch_model.safetensors), local or
on object storage; remote folders are copied to a temporary local folder first. Only safetensors
weights are accepted: a .bin file is a Python pickle, and loading one can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from speed import storage
from speed.config.schema import StorageConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CONFIG_NAME = "config.json"
_WEIGHT_SUFFIX = ".safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class VAEError(ValueError):
    """An unusable vae.path; the message says what to fix."""


def _check_folder(folder: Path, path: str) -> Path:
    """The safetensors weights file of a diffusers AutoencoderKL folder, after checking its layout."""
    if not folder.is_dir():
        raise VAEError(
            f"vae.path: '{path}' is not a folder; give a diffusers AutoencoderKL folder (config.json + "
            "diffusion_pytorch_model.safetensors), e.g. a copy of stabilityai/sd-vae-ft-ema"
        )
    if not (folder / _CONFIG_NAME).is_file():
        raise VAEError(f"vae.path: '{path}' has no {_CONFIG_NAME}; give a diffusers AutoencoderKL folder")
    weights = sorted(p for p in folder.iterdir() if p.name.endswith(_WEIGHT_SUFFIX))
    if not weights:
        pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise VAEError(
                f"vae.path: '{path}' holds only pickle weights ({', '.join(pickles)}), which can run code when "
                "loaded; convert them to safetensors (AutoencoderKL.from_pretrained(...).save_pretrained(folder, "
                "safe_serialization=True)) and point vae.path at that folder"
            )
        raise VAEError(f"vae.path: '{path}' has no {_WEIGHT_SUFFIX} weights; copy the VAE's safetensors file there")
    config = json.loads((folder / _CONFIG_NAME).read_text())
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise VAEError(f"vae.path: '{path}' holds a {config.get('_class_name')}, not an AutoencoderKL")
    return weights[0]


def _fetch(path: str, storage_cfg: Optional[StorageConfig], workdir: str) -> Path:
    if not path:
        raise VAEError("vae.path is empty; set it to a diffusers AutoencoderKL folder or URI (e.g. sd-vae-ft-ema)")
    if storage.is_s3(path) and not storage.is_dir(path, storage_cfg):
        raise VAEError(
            f"vae.path: '{path}' does not exist; upload the VAE folder (config.json + "
            "diffusion_pytorch_model.safetensors) there or fix vae.path"
        )
    local = Path(storage.local_copy(path, workdir, storage_cfg))
    if not local.exists():
        raise VAEError(f"vae.path: '{path}' does not exist; give a diffusers AutoencoderKL folder or fix the path")
    return local


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def vae_identity(path: str, storage_cfg: Optional[StorageConfig] = None) -> Dict[str, Any]:
    """What identifies a VAE (its config and a digest of its weights), checking the folder on the way.

    Stored beside encoded latents, so latents from a different VAE are never mixed in.
    """
    workdir = tempfile.mkdtemp(prefix="speed-vae-")
    try:
        folder = _fetch(path, storage_cfg, workdir)
        weights = _check_folder(folder, path)
        config = json.loads((folder / _CONFIG_NAME).read_text())
        return {
            "class": "AutoencoderKL",
            "source": path,
            "weights_sha256": _sha256(weights),
            "config": {k: v for k, v in config.items() if not k.startswith("_")},
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class VAE:
    """A loaded AutoencoderKL. Images are float [N, 3, H, W] in [-1, 1]; latents are [N, C, H/8, W/8]."""

    def __init__(self, model: torch.nn.Module, scale_factor: float, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.scale_factor = float(scale_factor)
        self.device = device
        self.dtype = dtype
        config = model.config
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, std), float32 [N, C, h, w], unscaled (multiply samples by scale_factor)."""
        posterior = self.model.encode(images.to(self.device, self.dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (what the diffusion model produces) -> images float32 [N, 3, H, W] in [-1, 1]."""
        unscaled = latents.to(self.device, self.dtype) / self.scale_factor
        return self.model.decode(unscaled).sample.float().clamp(-1.0, 1.0)


def load_vae(
    path: str,
    storage_cfg: Optional[StorageConfig] = None,
    *,
    dtype: str = "fp32",
    device: str | torch.device = "cpu",
    scale_factor: float = 0.18215,
) -> VAE:
    """Load the AutoencoderKL at ``path`` (local folder or s3:// prefix) for inference."""
    from diffusers import AutoencoderKL

    if dtype not in _DTYPES:
        raise VAEError(f"vae.dtype={dtype!r} is not valid; choose one of {', '.join(_DTYPES)}")
    workdir = tempfile.mkdtemp(prefix="speed-vae-")
    try:
        folder = _fetch(path, storage_cfg, workdir)
        _check_folder(folder, path)
        model = AutoencoderKL.from_pretrained(str(folder), use_safetensors=True, low_cpu_mem_usage=False)
    finally:
        # Remote weights were copied here only to load them; they live in memory now.
        shutil.rmtree(workdir, ignore_errors=True)
    device = torch.device(device)
    model = model.to(device=device, dtype=_DTYPES[dtype]).eval().requires_grad_(False)
    return VAE(model, scale_factor, device, _DTYPES[dtype])
