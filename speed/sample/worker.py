"""The per-actor step of batch sampling: load the EMA weights once, then turn index ranges into shards."""

from __future__ import annotations

import time
from typing import Dict

import numpy as np
import torch

from speed import storage
from speed.config.schema import Config
from speed.sample.generate import generate, sample_labels
from speed.sample.shards import encode_shard, shard_uri
from speed.sample.weights import load_sampling_model


def sampling_device(num_gpus: float) -> torch.device:
    # Ray hides GPUs from actors that did not ask for one, so this also holds inside Ray.
    return torch.device("cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu")


def load_vae_for(cfg: Config, description, device: torch.device):
    """The VAE that decodes this model's latents (None for pixel models), at the export's latent scale."""
    if not description.is_latent:
        return None
    from speed.data.vae import load_vae

    return load_vae(cfg.vae.path, cfg.storage, dtype=cfg.vae.dtype, device=device, scale_factor=description.latent_scale)


class ShardSampler:
    """Callable on batches of {"start", "end"} rows; writes ``shards/shard-S-E.npz`` for each."""

    def __init__(self, cfg: Config, checkpoint_uri: str, output_uri: str):
        inference = cfg.inference
        torch.set_num_threads(max(1, int(inference.num_cpus_per_actor)))
        self.device = sampling_device(inference.num_gpus_per_actor)
        if self.device.type == "cuda":
            # DiT's sample_ddp.py samples with TF32 matmuls; the published FIDs were measured so.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.cfg = cfg
        self.output_uri = output_uri
        self.model, self.description = load_sampling_model(checkpoint_uri, cfg.storage, device=self.device)
        self.vae = load_vae_for(cfg, self.description, self.device)
        self.num_classes = int(self.description.model["num_classes"])

    def render(self, start: int, end: int) -> bytes:
        inference = self.cfg.inference
        indices = np.arange(start, end)
        labels = sample_labels(indices, self.num_classes, inference.labels, inference.seed)
        images = generate(self.model, self.description, self.cfg.sampling, labels, indices, inference.seed,
                          self.device, self.vae)
        return encode_shard(images, labels, indices)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        seconds, written = [], []
        for start, end in zip(batch["start"].tolist(), batch["end"].tolist()):
            uri = shard_uri(self.output_uri, start, end)
            began = time.perf_counter()
            # A retried task may find its shard already written by the first attempt.
            fresh = not storage.exists(uri, self.cfg.storage)
            if fresh:
                storage.write_bytes(uri, self.render(start, end), self.cfg.storage)
            seconds.append(time.perf_counter() - began)
            written.append(fresh)
        return {"start": batch["start"], "end": batch["end"], "seconds": np.asarray(seconds),
                "written": np.asarray(written)}
