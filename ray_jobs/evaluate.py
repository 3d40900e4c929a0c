"""In-cluster evaluation: python -m ray_jobs.evaluate -c CONFIG [key=value ...] (phase evaluate).

Reads samples from eval.samples_uri (an ADM-format .npz or an inference output folder) and a
reference from eval.reference_uri (an ADM reference batch .npz, an imagefolder/Parquet dataset,
or "digits"). Feature extraction runs in a Ray Data ActorPoolStrategy of eval.num_actors actors
(Inception from eval.inception_weights, or the digits classifier); features come back to the
driver, where statistics are combined once: FID (float64 statistics; ADM's stored mu/sigma when
the reference has them), Inception Score, and k-NN precision/recall (k = eval.pr_k). Reference
statistics are cached beside the reference. Ends with
{"event": "evaluate_done", "fid", "inception_score", "precision", "recall", ...} on stdout and
writes the same record beside the samples.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from speed import storage
from speed.config.schema import Config, ConfigError, DataConfig
from speed.evaluate import (
    INCEPTION_SHA256_PREFIX,
    ArraySource,
    ExtractorSpec,
    FeatureWorker,
    ImageFolderSource,
    NpzSource,
    ParquetSource,
    ReferenceStatistics,
    RunningStatistics,
    default_classifier_uri,
    get_digits_classifier,
    load_inception_state_dict,
    load_reference_cache,
    pr_subset,
    reference_cache_uri,
    save_reference_cache,
    summarize,
)
from speed.sample import find_samples_npz, npz_keys, read_small_arrays

from ray_jobs.common import emit, init_ray, load_job_config, progress_bar, run_main
from ray_jobs.inference import ray_data_progress_bars

log = logging.getLogger("speed.evaluate")

DIGITS_REFERENCE = "digits"


def build_extractor_spec(cfg: Config, inception_sha256: Optional[str] = INCEPTION_SHA256_PREFIX) -> ExtractorSpec:
    """Check the extractor on the driver (weights verified, classifier trained and cached once)."""
    kind = cfg.eval.feature_extractor
    if kind == "inception":
        _, digest = load_inception_state_dict(cfg.eval.inception_weights, cfg.storage, expected_sha256=inception_sha256)
        return ExtractorSpec("inception", inception_weights=cfg.eval.inception_weights,
                             inception_sha256=inception_sha256, weights_digest=digest, storage_cfg=cfg.storage)
    classifier_uri = default_classifier_uri(cfg.eval, cfg.run.output_uri)
    get_digits_classifier(classifier_uri, cfg.storage)
    return ExtractorSpec("digits", classifier_uri=classifier_uri, storage_cfg=cfg.storage)


def _digits_images(resolution: int, channels: int) -> np.ndarray:
    from speed.data.digits import load_digits
    from speed.data.transforms import to_uint8_images

    images, _ = load_digits(resolution, channels)
    return to_uint8_images(images)


def _dataset_source(cfg: Config, uri: str, image_shape: Tuple[int, int, int]):
    """An imagefolder or Parquet reference dataset, cropped to the samples' size."""
    from speed.data.catalog import DataFormatError, scan_dataset

    resolution, channels = image_shape[0], image_shape[2]
    files = storage.list_files(uri, cfg.storage)
    fmt = "parquet" if any(f.lower().endswith(".parquet") for f in files) else "imagefolder"
    data = DataConfig(format=fmt, uri=uri, resolution=resolution, channels=channels, on_error="raise",
                      image_column=cfg.data.image_column, label_column=cfg.data.label_column)
    try:
        catalog = scan_dataset(data, cfg.storage)
    except (DataFormatError, storage.StorageError) as exc:
        raise ConfigError(f"eval.reference_uri: {exc}") from None
    if fmt == "parquet":
        return ParquetSource(uri, catalog.files, catalog.rows, cfg.data.image_column, resolution, channels, cfg.storage)
    return ImageFolderSource(uri, catalog.files, resolution, channels, cfg.storage)


class ReferencePlan:
    """What is known about the reference before extraction, and what still has to be computed."""

    def __init__(self, name: str, ready: Optional[ReferenceStatistics] = None, source=None,
                 stored_stats=None, cache_uri: Optional[str] = None, identity: Optional[Dict[str, Any]] = None):
        self.name = name
        self.ready = ready
        self.source = source
        self.stored_stats = stored_stats  # ADM's mu/sigma: FID uses these over recomputed ones
        self.cache_uri = cache_uri
        self.identity = identity or {}


def plan_reference(cfg: Config, spec: ExtractorSpec, image_shape: Tuple[int, int, int]) -> ReferencePlan:
    uri = cfg.eval.reference_uri or (DIGITS_REFERENCE if spec.kind == "digits" else None)
    if not uri:
        raise ConfigError(
            "eval.reference_uri is not set; give an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz), "
            "a dataset folder/prefix, or 'digits'"
        )
    if uri == DIGITS_REFERENCE:
        if spec.kind == "digits":
            classifier = get_digits_classifier(spec.classifier_uri, cfg.storage)
            stats, _ = classifier.reference()
            features = classifier.reference_features.numpy()
            return ReferencePlan(uri, ready=ReferenceStatistics(stats, features, uri))
        return ReferencePlan(uri, source=ArraySource(_digits_images(image_shape[0], image_shape[2])))

    from speed.evaluate.stats import FeatureStatistics

    extractor = "inception" if spec.kind == "inception" else "digits"
    cache_uri = reference_cache_uri(uri, extractor)
    if str(uri).endswith(".npz"):
        if not storage.exists(uri, cfg.storage):
            raise ConfigError(f"eval.reference_uri: '{uri}' does not exist; fix the path or URI")
        keys = set(npz_keys(uri, cfg.storage))
        stored = None
        if spec.kind == "inception" and {"mu", "sigma"} <= keys:
            arrays = read_small_arrays(uri, ["mu", "sigma"], cfg.storage)
            stored = FeatureStatistics(mu=arrays["mu"].astype(np.float64), sigma=arrays["sigma"].astype(np.float64), count=0)
        if "arr_0" not in keys:
            if stored is None:
                raise ConfigError(
                    f"eval.reference_uri: '{uri}' has neither images (arr_0) nor Inception statistics (mu, sigma)"
                )
            log.warning("reference %s has no images (arr_0): precision/recall are not computed", uri)
            return ReferencePlan(uri, ready=ReferenceStatistics(stored, None, uri))
        source = NpzSource(uri, "arr_0", cfg.storage)
        identity = {**spec.identity(), "source": str(uri), "num_images": len(source)}
    else:
        source = _dataset_source(cfg, uri, image_shape)
        identity = {**spec.identity(), "source": str(uri), "num_images": len(source),
                    "resolution": image_shape[0], "channels": image_shape[2]}
        stored = None
    cached = load_reference_cache(cache_uri, identity, cfg.storage)
    if cached is not None:
        log.info("using cached reference statistics %s", cache_uri)
        if stored is not None:
            stored.count = cached.stats.count
            cached.stats = stored
        return ReferencePlan(uri, ready=cached)
    return ReferencePlan(uri, source=source, stored_stats=stored, cache_uri=cache_uri, identity=identity)


def extract_features(cfg: Config, spec: ExtractorSpec, sources: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """One Ray Data pass over every source's items; per source: features/logits in index order
    (samples) or running statistics plus the precision/recall subset (reference)."""
    import ray

    items: List[Dict[str, Any]] = []
    for name, source in sources.items():
        items.extend(source.items(name, cfg.eval.batch_size))
    totals = {name: len(source) for name, source in sources.items()}
    num_actors = max(1, min(cfg.eval.num_actors, len(items)))
    collected: Dict[str, Dict[str, Any]] = {}
    # A Dataset keeps the context it was created under: switch the bars off before creating it.
    with ray_data_progress_bars(False), progress_bar(sum(totals.values()), unit="img", desc="features") as progress:
        dataset = ray.data.from_items(items).map_batches(
            FeatureWorker,
            fn_constructor_kwargs={"spec": spec, "sources": sources, "batch_size": cfg.eval.batch_size},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_gpus=cfg.eval.num_gpus_per_actor or None,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for name in np.unique(batch["source"]):
                mask = batch["source"] == name
                index, features, logits = batch["index"][mask], batch["features"][mask], batch["logits"][mask]
                _collect(collected, str(name), totals[str(name)], index, features, logits)
                progress.update(int(mask.sum()))
    return collected


def _collect(collected, name: str, total: int, index, features, logits) -> None:
    entry = collected.get(name)
    if entry is None:
        entry = collected[name] = {
            "features": np.zeros((total, features.shape[1]), np.float32),
            "logits": np.zeros((total, logits.shape[1]), np.float32),
            "seen": np.zeros(total, bool),
        } if name == "samples" else {
            "running": RunningStatistics(features.shape[1]),
            "subset": pr_subset(total),
            "kept": {},
            "seen": np.zeros(total, bool),
        }
    entry["seen"][index] = True
    if name == "samples":
        entry["features"][index] = features
        entry["logits"][index] = logits
        return
    entry["running"].update(features)
    keep = np.isin(index, entry["subset"])
    for i, row in zip(index[keep], features[keep]):
        entry["kept"][int(i)] = row


def _reference_from(entry: Dict[str, Any], plan: ReferencePlan, storage_cfg) -> ReferenceStatistics:
    stats = entry["running"].result()
    features = np.stack([entry["kept"][i] for i in sorted(entry["kept"])]).astype(np.float32)
    reference = ReferenceStatistics(stats, features, plan.name)
    if plan.cache_uri:
        save_reference_cache(plan.cache_uri, reference, plan.identity, storage_cfg)
    if plan.stored_stats is not None:
        plan.stored_stats.count = stats.count
        reference = ReferenceStatistics(plan.stored_stats, features, plan.name)
    return reference


def _summarize_on_cluster(cfg: Config, samples: Dict[str, Any], reference: ReferenceStatistics,
                          labels: Optional[np.ndarray], with_class_accuracy: bool) -> Dict[str, Any]:
    """k-NN precision/recall over 50k x 50k features wants a GPU: run it in a GPU task when actors get one."""
    kwargs = dict(labels=labels, k=cfg.eval.pr_k, with_class_accuracy=with_class_accuracy)
    if cfg.eval.num_gpus_per_actor > 0:
        import ray

        def run_on_gpu(features, logits, ref):
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            return summarize(features, logits, ref, device=device, **kwargs)

        task = ray.remote(num_gpus=1)(run_on_gpu)
        return ray.get(task.remote(samples["features"], samples["logits"], reference))
    return summarize(samples["features"], samples["logits"], reference, **kwargs)


def result_uri(samples_npz: str) -> str:
    base = samples_npz[: -len(".npz")] if samples_npz.endswith(".npz") else samples_npz
    return f"{base}.eval.json"


def run_evaluation(cfg: Config, *, inception_sha256: Optional[str] = INCEPTION_SHA256_PREFIX) -> Dict[str, Any]:
    """The whole job; ``inception_sha256=None`` is for tests with random Inception weights only."""
    samples_npz = find_samples_npz(cfg.eval.samples_uri, cfg.storage)
    samples = NpzSource(samples_npz, "arr_0", cfg.storage)
    image_shape = samples.image_shape
    labels = read_small_arrays(samples_npz, ["arr_1"], cfg.storage).get("arr_1")
    spec = build_extractor_spec(cfg, inception_sha256)
    plan = plan_reference(cfg, spec, image_shape)
    sources = {"samples": samples}
    if plan.ready is None:
        sources["reference"] = plan.source
    init_ray(cfg)
    collected = extract_features(cfg, spec, sources)
    missing = {name: int((~entry["seen"]).sum()) for name, entry in collected.items() if not entry["seen"].all()}
    if missing or set(collected) != set(sources):
        raise RuntimeError(f"feature extraction lost images ({missing or 'a whole set'}); rerun the job")
    reference = plan.ready or _reference_from(collected["reference"], plan, cfg.storage)
    metrics = _summarize_on_cluster(cfg, collected["samples"], reference, labels, spec.kind == "digits")
    record = {
        **metrics,
        "feature_extractor": spec.kind,
        "samples": samples_npz,
        "reference": plan.name,
    }
    if spec.kind == "digits":
        record["digits_fid"] = record["fid"]
    uri = result_uri(samples_npz)
    storage.write_text(uri, json.dumps({"event": "evaluate_done", **record}, indent=2) + "\n", cfg.storage)
    record["result_uri"] = uri
    return record


def _main(argv: List[str]) -> None:
    cfg = load_job_config("evaluate", argv)
    emit("evaluate_done", **run_evaluation(cfg))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_main("evaluate", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
