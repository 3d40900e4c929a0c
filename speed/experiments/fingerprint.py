"""A trial's run is resumed only when its resolved config matches the one it was started with.

Both front ends (``benchmarks.speedup`` and ``ray_jobs.tune``) keep one training run per trial,
found again by the trial's name. A name says nothing about the data or the budget, so each run
folder holds ``config_fingerprint.json``: the resolved config of the trial (every key that can change
its results: data, model, diffusion and strategy, optimizer, budget, evaluation, sampling, seed),
plus what the front end adds (``extra``: e.g. a digest of the data actually loaded) and its hash.
Before a run is resumed or its results reused, ``check_run_fingerprint`` compares it with the
current trial's and stops with a ``FingerprintMismatch`` naming the keys that differ.

Left out (``EXCLUDED``): where things are written and how the work is scheduled, which never
change a result: run.name, run.output_uri, the trackers, storage, ray, tune, prepare, checkpoint
cadence, cache locations and reader settings. Any other key is part of the fingerprint; a key
added to the schema after a run was fingerprinted matches only at its default value (new options
default to the old behaviour), so an upgraded checkout still resumes its runs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Mapping, Optional, Tuple

from speed import storage
from speed.config.load import to_dict
from speed.config.schema import Config, ConfigError, StorageConfig

FINGERPRINT_FILE = "config_fingerprint.json"
FINGERPRINT_VERSION = 1
# Dotted keys (a section excludes everything under it).
EXCLUDED: Tuple[str, ...] = (
    "run.name", "run.output_uri", "run.trackers", "run.tracker_project",
    "storage", "ray", "tune", "prepare",
    "train.checkpoint_every", "train.keep_checkpoints", "train.resume_from", "train.async_checkpoint",
    "train.sample_every", "sample",
    "eval.classifier_uri", "eval.cache_uri", "eval.samples_uri", "eval.batch_size", "eval.num_actors",
    "eval.num_gpus_per_actor",
    "data.read_cpus", "data.prefetch_batches", "data.max_logged_errors", "data.catalog", "data.catalog_uri",
)


class FingerprintMismatch(ConfigError):
    """A run folder holds results of another config; the message names the differing keys."""


def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, Mapping) and node:
        out: Dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _excluded(key: str) -> bool:
    return any(key == e or key.startswith(e + ".") for e in EXCLUDED)


def resolved_config(cfg: Config, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Dotted key -> value of everything in ``cfg`` that can change a trial's results, plus
    ``extra`` (its keys as given), as plain JSON values."""
    flat = {k: v for k, v in _flatten(to_dict(cfg)).items() if not _excluded(k)}
    flat.update(dict(extra or {}))
    return json.loads(json.dumps(flat, sort_keys=True, default=str))


def config_fingerprint(cfg: Config, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """{"version", "sha256", "config": resolved_config(cfg, extra)}."""
    config = resolved_config(cfg, extra)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    return {"version": FINGERPRINT_VERSION, "sha256": digest, "config": config}


def fingerprint_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(key, stored value, current value) for each key whose values differ (missing = None), sorted."""
    missing = object()
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, missing), current.get(key, missing)
        if a != b:
            out.append((key, None if a is missing else a, None if b is missing else b))
    return out


def _schema_defaults() -> Dict[str, Any]:
    return resolved_config(Config())


def _relevant(differences: List[Tuple[str, Any, Any]], stored: Mapping[str, Any]) -> List[Tuple[str, Any, Any]]:
    """Differences, less keys the stored fingerprint predates that are at their schema default now."""
    defaults = _schema_defaults()
    return [(k, a, b) for k, a, b in differences if k in stored or k not in defaults or defaults[k] != b]


def _describe(differences: List[Tuple[str, Any, Any]], limit: int = 8) -> str:
    parts = [f"{k}: {a!r} then, {b!r} now" for k, a, b in differences[:limit]]
    if len(differences) > limit:
        parts.append(f"and {len(differences) - limit} more")
    return "; ".join(parts)


def read_fingerprint(run_uri: str, storage_cfg: Optional[StorageConfig] = None) -> Optional[Dict[str, Any]]:
    uri = storage.join(run_uri, FINGERPRINT_FILE)
    if not storage.exists(uri, storage_cfg):
        return None
    return json.loads(storage.read_text(uri, storage_cfg))


def write_fingerprint(run_uri: str, fingerprint: Dict[str, Any], storage_cfg: Optional[StorageConfig] = None) -> None:
    storage.write_text(storage.join(run_uri, FINGERPRINT_FILE), json.dumps(fingerprint, indent=1, sort_keys=True),
                       storage_cfg)


def check_run_fingerprint(run_uri: str, cfg: Config, *, has_results: bool, extra: Optional[Mapping[str, Any]] = None,
                          storage_cfg: Optional[StorageConfig] = None, fix: str = "use a fresh folder",
                          write: bool = True) -> Dict[str, Any]:
    """Make sure the run in ``run_uri`` may be resumed as ``cfg`` (+ ``extra``); returns the fingerprint.

    ``has_results``: the folder already holds checkpoints or metrics. Then its stored fingerprint
    must exist and match, else ``FingerprintMismatch`` names the differing keys (``fix`` says what
    to do instead). A folder without results gets the fingerprint written (``write``), so the run
    that is about to start can be checked next time.
    """
    current = config_fingerprint(cfg, extra)
    stored = read_fingerprint(run_uri, storage_cfg)
    if stored is not None and stored.get("sha256") == current["sha256"]:
        return current
    if stored is not None and has_results:
        differences = _relevant(fingerprint_differences(stored.get("config") or {}, current["config"]),
                                stored.get("config") or {})
        if not differences and stored.get("version") == current["version"]:
            if write:  # the same config, described with today's keys
                write_fingerprint(run_uri, current, storage_cfg)
            return current
    if has_results:
        if stored is None:
            raise FingerprintMismatch(
                f"run folder '{run_uri}' holds results but no {FINGERPRINT_FILE} (made before runs were "
                f"fingerprinted, or by another tool), so nothing says they belong to this config; {fix}"
            )
        raise FingerprintMismatch(
            f"run folder '{run_uri}' holds results of another config ({_describe(differences) or 'fingerprint format'}); "
            f"it is resumed only with the same config: rerun with the settings it was made with, or {fix}"
        )
    if write:
        write_fingerprint(run_uri, current, storage_cfg)
    return current
