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
from speed.train.run_layout import RunLayout, checkpoint_dir_name


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
    """The same tensors every step (tests of the update itself). ``clean``: the clean images
    beside latent ``images`` (REPA on latents), then yielded as a third tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, clean: Optional[torch.Tensor] = None):
        self.images, self.labels, self.clean = images, labels, clean

    def batch(self, step: int, offset: int, count: int) -> Tuple[torch.Tensor, ...]:
        rows = slice(offset, offset + count)
        if self.clean is None:
            return self.images[rows], self.labels[rows]
        return self.images[rows], self.labels[rows], self.clean[rows]


class LocalReporter:
    """Keeps metrics and moves checkpoint folders into the run folder as ``checkpoint_<step>``,
    the layout Ray Train gives them (no Ray; tests and single-process tools). Local run folders
    only: the Ray path hands checkpoints to Ray Train, which uploads them to any storage."""

    def __init__(self, layout: RunLayout, keep: int = 2):
        if storage.is_s3(layout.root):
            raise ValueError("LocalReporter keeps checkpoints on local disk only; use the Ray job for s3:// runs")
        self.layout = layout
        self.keep = keep
        self.metrics: List[Dict[str, Any]] = []

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None,
               checkpoint_name: Optional[str] = None) -> None:
        self.metrics.append(dict(metrics))
        if checkpoint_dir is None:
            return
        target = Path(self.layout.path(checkpoint_name or checkpoint_dir_name(int(metrics["step"]))))
        target.parent.mkdir(parents=True, exist_ok=True)
        # Move into place with one rename, so a half-copied folder is never visible.
        staging = target.parent / f".{target.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(checkpoint_dir, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        for _, uri in self.layout.checkpoints()[: -self.keep]:
            shutil.rmtree(uri, ignore_errors=True)

    def latest(self) -> Optional[str]:
        found = self.layout.checkpoints()
        return found[-1][1] if found else None
