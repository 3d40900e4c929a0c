"""Layout of a batch-sampling job's output folder, and the resumable shard plan.

  <output>/inference.json          the settings that determine the images (checked on rerun)
  <output>/shards/shard-S-E.npz    samples [S, E): images uint8 [n, H, W, C], labels, indices
  <output>/samples.npz             every sample in ADM's format: arr_0 uint8 [N, H, W, C], arr_1 labels
  <output>/preview.png             a grid of the first samples

Shards cover fixed index ranges of ``inference.batch_size`` samples, and each is one sampling
batch, so a sample's image never depends on how many actors ran. Shards are written atomically
and skipped when present: a killed job resumes where it stopped.
"""

from __future__ import annotations

import io
import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterator, List, Optional, Set, Tuple

import numpy as np

from speed import storage
from speed.config.load import to_dict
from speed.config.schema import Config, ConfigError, StorageConfig
from speed.train.export import ModelDescription

from speed.sample.npz import NpzWriter

MANIFEST_NAME = "inference.json"
SHARDS_DIR = "shards"
NPZ_NAME = "samples.npz"
PREVIEW_NAME = "preview.png"
RESULT_NAME = "sample_result.json"
PREVIEW_COUNT = 64


@dataclass(frozen=True)
class ShardPlan:
    num_samples: int
    batch_size: int

    def ranges(self) -> List[Tuple[int, int]]:
        return [(s, min(s + self.batch_size, self.num_samples)) for s in range(0, self.num_samples, self.batch_size)]


def shard_name(start: int, end: int) -> str:
    return f"shard-{start:09d}-{end:09d}.npz"


def shard_uri(output_uri: str, start: int, end: int) -> str:
    return storage.join(output_uri, SHARDS_DIR, shard_name(start, end))


def existing_shards(output_uri: str, storage_cfg: Optional[StorageConfig] = None) -> Set[str]:
    """Names of the shard files already written (one listing, not one request per shard)."""
    return {uri.replace("\\", "/").rsplit("/", 1)[-1] for uri in storage.list_files(storage.join(output_uri, SHARDS_DIR), storage_cfg)}


def pending_ranges(plan: ShardPlan, output_uri: str, storage_cfg: Optional[StorageConfig] = None) -> List[Tuple[int, int]]:
    done = existing_shards(output_uri, storage_cfg)
    return [(s, e) for s, e in plan.ranges() if shard_name(s, e) not in done]


def encode_shard(images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, images=np.asarray(images, np.uint8), labels=np.asarray(labels, np.int64),
             indices=np.asarray(indices, np.int64))
    return buffer.getvalue()


def decode_shard(blob: bytes) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        return data["images"], data["labels"], data["indices"]


def sampling_manifest(cfg: Config, description: ModelDescription, checkpoint_uri: str) -> Dict[str, Any]:
    """Everything that determines the images of a sample index (not the sample count or actor count)."""
    return {
        "checkpoint_uri": str(checkpoint_uri),
        "model": description.model,
        "step": description.step,
        "resolution": description.resolution,
        "data_format": description.data_format,
        "sampling": to_dict(cfg.sampling),
        "seed": cfg.inference.seed,
        "labels": cfg.inference.labels,
        "batch_size": cfg.inference.batch_size,
        "vae_path": cfg.vae.path if description.is_latent else None,
    }


def claim_output(output_uri: str, manifest: Dict[str, Any], storage_cfg: Optional[StorageConfig] = None) -> bool:
    """Write the manifest, or check that a previous run's matches; True when resuming."""
    uri = storage.join(output_uri, MANIFEST_NAME)
    if storage.exists(uri, storage_cfg):
        previous = json.loads(storage.read_text(uri, storage_cfg))
        changed = sorted(k for k in set(previous) | set(manifest) if previous.get(k) != manifest.get(k))
        if changed:
            raise ConfigError(
                f"inference.output_uri: '{output_uri}' holds samples made with different settings "
                f"({', '.join(changed)}); choose a new inference.output_uri, or delete that folder to start over"
            )
        return True
    storage.write_text(uri, json.dumps(manifest, indent=2, sort_keys=True) + "\n", storage_cfg)
    return False


def iter_shards(output_uri: str, plan: ShardPlan, storage_cfg: Optional[StorageConfig] = None,
                prefetch: int = 8) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of every shard of ``plan``, in index order, checking each covers its range.

    Up to ``prefetch`` shards are fetched ahead in threads: object-store latency, not bandwidth,
    would otherwise bound assembling thousands of shards.
    """
    ranges = plan.ranges()
    with ThreadPoolExecutor(max_workers=max(1, prefetch)) as pool:
        pending: Deque[Tuple[int, int, Future]] = deque()
        for position in range(len(ranges)):
            while len(pending) < prefetch and position + len(pending) < len(ranges):
                start, end = ranges[position + len(pending)]
                pending.append((start, end, pool.submit(storage.read_bytes, shard_uri(output_uri, start, end), storage_cfg)))
            start, end, future = pending.popleft()
            images, labels, indices = decode_shard(future.result())
            if not np.array_equal(indices, np.arange(start, end)):
                raise ValueError(
                    f"shard '{shard_uri(output_uri, start, end)}' does not hold samples {start}..{end - 1}; delete it and rerun"
                )
            yield images, labels


def write_samples_npz(output_uri: str, plan: ShardPlan, image_shape: Tuple[int, int, int],
                      storage_cfg: Optional[StorageConfig] = None) -> Tuple[str, np.ndarray]:
    """Assemble ``samples.npz`` from the shards (streamed); returns its URI and the first images."""
    uri = storage.join(output_uri, NPZ_NAME)
    labels: List[np.ndarray] = []
    preview: List[np.ndarray] = []

    def image_chunks() -> Iterator[np.ndarray]:
        kept = 0
        for images, shard_labels in iter_shards(output_uri, plan, storage_cfg):
            if images.shape[1:] != tuple(image_shape):
                raise ValueError(f"a shard holds images of shape {images.shape[1:]}, expected {tuple(image_shape)}")
            labels.append(shard_labels)
            if kept < PREVIEW_COUNT:
                preview.append(images[: PREVIEW_COUNT - kept])
                kept += len(preview[-1])
            yield images

    with NpzWriter(uri, storage_cfg) as writer:
        writer.write_array("arr_0", (plan.num_samples, *image_shape), np.uint8, image_chunks())
        all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        writer.write_array("arr_1", all_labels.shape, np.int64, [all_labels])
    first = np.concatenate(preview) if preview else np.zeros((0, *image_shape), np.uint8)
    return uri, first


def find_samples_npz(uri: str, storage_cfg: Optional[StorageConfig] = None, key: str = "eval.samples_uri") -> str:
    """An .npz URI given either the file or an inference output folder."""
    if not uri:
        raise ConfigError(f"{key} is not set; give a samples .npz or the output folder of python -m ray_jobs.inference")
    if storage.is_dir(uri, storage_cfg):
        candidate = storage.join(uri, NPZ_NAME)
        if storage.exists(candidate, storage_cfg):
            return candidate
        raise ConfigError(
            f"{key}: folder '{uri}' has no {NPZ_NAME}; run (or finish) python -m ray_jobs.inference with "
            f"inference.output_uri={uri}, or point {key} at an .npz file"
        )
    if not storage.exists(uri, storage_cfg):
        raise ConfigError(f"{key}: '{uri}' does not exist; fix the path or URI")
    return uri
