"""Reference statistics (what samples are compared with), their cache, and the final metrics.

A reference is an ADM reference batch (.npz with stored ``mu``/``sigma`` and images ``arr_0``),
a dataset (imagefolder or Parquet), or the embedded digits. Its feature statistics, plus the
features of up to ``PR_REFERENCE_MAX`` of its images for precision/recall, are computed once and
cached beside it as ``<name>.<extractor>-reference.npz``, keyed by the extractor's identity.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from speed import storage
from speed.config.schema import StorageConfig
from speed.evaluate.precision_recall import precision_recall
from speed.evaluate.stats import FeatureStatistics, class_accuracy, feature_statistics, frechet_distance, inception_score

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# Precision/recall compare against at most this many reference images (a seeded subset), as ADM's
# 10k-50k reference batches do; statistics always use every image.
PR_REFERENCE_MAX = 50_000
PR_SUBSET_SEED = 0


@dataclass
class ReferenceStatistics:
    stats: FeatureStatistics
    features: Optional[np.ndarray]  # float32 [M, D] for precision/recall, None when unavailable
    source: str


def pr_subset(total: int, limit: int = PR_REFERENCE_MAX, seed: int = PR_SUBSET_SEED) -> np.ndarray:
    """Sorted indices of the reference images kept for precision/recall (all when few)."""
    if total <= limit:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))


def reference_cache_uri(reference_uri: str, extractor: str) -> str:
    """``x.npz`` -> ``x.<extractor>-reference.npz``; a folder ``data/set`` -> ``data/set.<extractor>-reference.npz``."""
    base = str(reference_uri).rstrip("/")
    if base.endswith(".npz"):
        base = base[: -len(".npz")]
    name = f"{posixpath.basename(base) if storage.is_s3(base) else Path(base).name}.{extractor}-reference.npz"
    parent = posixpath.dirname(base) if storage.is_s3(base) else str(Path(base).parent)
    return storage.join(parent, name)


def save_reference_cache(uri: str, reference: ReferenceStatistics, identity: Dict[str, Any],
                         storage_cfg: Optional[StorageConfig] = None) -> bool:
    """Write the cache; a read-only location only costs recomputation next time (False)."""
    buffer = io.BytesIO()
    arrays = {
        "mu": reference.stats.mu,
        "sigma": reference.stats.sigma,
        "count": np.asarray(reference.stats.count, dtype=np.int64),
        "identity": np.asarray(json.dumps({**identity, "cache_version": CACHE_VERSION}, sort_keys=True)),
    }
    if reference.features is not None:
        arrays["features"] = reference.features.astype(np.float32)
    np.savez(buffer, **arrays)
    try:
        storage.write_bytes(uri, buffer.getvalue(), storage_cfg)
    except (OSError, storage.StorageError) as exc:
        log.warning("cannot cache reference statistics at %s (%s); they will be recomputed next time", uri, exc)
        return False
    return True


def load_reference_cache(uri: str, identity: Dict[str, Any], storage_cfg: Optional[StorageConfig] = None,
                         ) -> Optional[ReferenceStatistics]:
    """The cached reference if present and made by the same extractor from the same source, else None."""
    if not storage.exists(uri, storage_cfg):
        return None
    try:
        with np.load(io.BytesIO(storage.read_bytes(uri, storage_cfg)), allow_pickle=False) as data:
            stored = json.loads(str(data["identity"]))
            if stored != {**identity, "cache_version": CACHE_VERSION}:
                log.info("reference cache %s was made differently (%s); recomputing", uri, stored)
                return None
            stats = FeatureStatistics(mu=data["mu"], sigma=data["sigma"], count=int(data["count"]))
            features = data["features"] if "features" in data.files else None
    except (ValueError, KeyError, OSError) as exc:
        log.warning("reference cache %s is unreadable (%s); recomputing", uri, exc)
        return None
    return ReferenceStatistics(stats=stats, features=features, source=identity.get("source", uri))


def summarize(sample_features: np.ndarray, sample_logits: np.ndarray, reference: ReferenceStatistics, *,
              labels: Optional[np.ndarray] = None, k: int = 3, device=None, with_class_accuracy: bool = False,
              ) -> Dict[str, Any]:
    """FID, Inception Score, precision/recall (and class accuracy for the digits classifier)."""
    stats = feature_statistics(sample_features)
    result: Dict[str, Any] = {
        "fid": frechet_distance(stats.mu, stats.sigma, reference.stats.mu, reference.stats.sigma),
        "inception_score": inception_score(sample_logits),
        "precision": None,
        "recall": None,
        "num_samples": int(len(sample_features)),
        "num_reference": int(reference.stats.count),
    }
    if reference.features is not None:
        result["precision"], result["recall"] = precision_recall(reference.features, sample_features, k=k, device=device)
        result["num_reference_pr"] = int(len(reference.features))
    if with_class_accuracy and labels is not None:
        result["class_accuracy"] = class_accuracy(sample_logits, labels)
    return result
