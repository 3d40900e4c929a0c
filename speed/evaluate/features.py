"""Feature extractors (Inception or the digits classifier) and the per-worker extraction step.

``FeatureWorker`` is a plain callable class: Ray Data runs it as an actor (one extractor loaded
per actor), tests and small jobs can call it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from speed.config.schema import ConfigError, StorageConfig
from speed.evaluate.inception import INCEPTION_SHA256_PREFIX, load_inception
from speed.evaluate.digits import CLASSIFIER_SEED, CLASSIFIER_VERSION, get_digits_classifier


@dataclass(frozen=True)
class ExtractorSpec:
    """What to build in each worker; ``identity`` names it for reference-statistics caches."""

    kind: str  # inception | digits
    inception_weights: Optional[str] = None
    # Checked in every worker; only tests pass None (random weights).
    inception_sha256: Optional[str] = INCEPTION_SHA256_PREFIX
    weights_digest: str = ""  # the full SHA-256 the driver saw, for cache identity
    classifier_uri: Optional[str] = None
    storage_cfg: Optional[StorageConfig] = field(default=None, compare=False)

    def identity(self) -> Dict[str, Any]:
        if self.kind == "inception":
            return {"extractor": "inception-v3-pool3", "weights_sha256": self.weights_digest}
        return {"extractor": "digits-classifier", "version": CLASSIFIER_VERSION, "seed": CLASSIFIER_SEED}

    def build(self, device: torch.device):
        """A callable uint8 [N, H, W, C] -> (features float32 [N, D], logits float32 [N, K])."""
        if self.kind == "inception":
            network = load_inception(self.inception_weights, self.storage_cfg,
                                     expected_sha256=self.inception_sha256, device=device)
            return lambda images: network.embed(images, device)
        if self.kind == "digits":
            classifier = get_digits_classifier(self.classifier_uri, self.storage_cfg)
            return classifier.embed
        raise ConfigError(f"eval.feature_extractor={self.kind!r} is not valid; choose digits or inception")


class FeatureWorker:
    """Reads each item's images from its source and returns their features and logits."""

    def __init__(self, spec: ExtractorSpec, sources: Dict[str, Any], batch_size: int = 250, num_threads: int = 0):
        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.extract = spec.build(self.device)
        self.sources = sources
        self.batch_size = max(1, int(batch_size))

    def _extract(self, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        # An item may be a whole Parquet file; the network sees at most batch_size images at once.
        parts = [self.extract(images[s : s + self.batch_size]) for s in range(0, len(images), self.batch_size)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        out: Dict[str, list] = {"source": [], "index": [], "features": [], "logits": []}
        for name, start, end, refs in zip(batch["source"], batch["start"], batch["end"], batch["refs"]):
            item = {"source": str(name), "start": int(start), "end": int(end), "refs": str(refs)}
            images = self.sources[item["source"]].read(item)
            features, logits = self._extract(images)
            count = len(images)
            out["source"].append(np.full(count, item["source"], dtype=object))
            out["index"].append(np.arange(item["start"], item["start"] + count, dtype=np.int64))
            out["features"].append(features.astype(np.float32))
            out["logits"].append(logits.astype(np.float32))
        return {
            "source": np.concatenate(out["source"]).astype(str),
            "index": np.concatenate(out["index"]),
            "features": np.concatenate(out["features"]),
            "logits": np.concatenate(out["logits"]),
        }
