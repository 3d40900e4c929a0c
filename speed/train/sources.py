"""Batch sources and reporters the loop can use without Ray.

``IndexedSource`` serves an in-memory dataset (the embedded digits) in an exact, seeded,
index-based order: global batch ``step`` is a pure function of (seed, step), so a resumed run
sees exactly the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from speed import storage


class IndexedSource:
    """Rank's share of global batch ``step`` from in-memory tensors, by global sample index."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int, global_batch: int):
        from speed.data.digits import digits_batch_indices

        self.images = images  # [N, C, H, W]
        self.labels = labels  # [N]
        self.seed = seed
        self.global_batch = global_batch
        self._indices = digits_batch_indices

    def batch(self, step: int, offset: int, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
        index = self._indices(step, self.global_batch, len(self.labels), self.seed)[offset : offset + count]
        return self.images[index], self.labels[index]


class FixedSource:
    """The same tensors every step (tests of the update itself)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def batch(self, step: int, offset: int, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.images[offset : offset + count], self.labels[offset : offset + count]


class LocalReporter:
    """Keeps metrics and moves checkpoint folders under <run>/checkpoints/step_<N> (no Ray).

    Used by tests and single-process tools; only local run folders are supported here (the Ray
    path hands checkpoints to Ray Train, which uploads them to any storage).
    """

    def __init__(self, run_uri: str, keep: int = 2):
        if storage.is_s3(run_uri):
            raise ValueError("LocalReporter keeps checkpoints on local disk only; use the Ray job for s3:// runs")
        self.root = Path(run_uri) / "checkpoints"
        self.keep = keep
        self.metrics: List[Dict[str, Any]] = []
        self.checkpoints: List[Path] = sorted(self.root.glob("step_*")) if self.root.exists() else []

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None) -> None:
        self.metrics.append(dict(metrics))
        if checkpoint_dir is None:
            return
        target = self.root / f"step_{int(metrics['step']):07d}"
        self.root.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        # Move into place with one rename, so a half-copied folder is never visible.
        staging = self.root / f".{target.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(checkpoint_dir, staging)
        staging.rename(target)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        self.checkpoints.append(target)
        while len(self.checkpoints) > self.keep:
            shutil.rmtree(self.checkpoints.pop(0), ignore_errors=True)

    def latest(self) -> Optional[str]:
        return str(self.checkpoints[-1]) if self.checkpoints else None
