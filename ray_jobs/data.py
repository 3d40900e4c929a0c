"""Ray Data wiring that streams training data from object storage into Ray Train workers.

Only the wiring lives here (read -> map_batches with ``speed.data.records`` functions -> the
trainer's local shuffle); the record-level work (decode and crop per format, the bad-record
policy, latent orientation, catalog and epoch planning) is plain functions in ``speed.data``.

``build_train_dataset(cfg, seed=..., epoch=..., skip_images=..., num_epochs=...)`` returns
``num_epochs`` consecutive epochs (default one) of ``data.format`` (imagefolder | parquet |
webdataset | latents) as one ``ray.data.Dataset``: files are read in a seeded per-epoch order (a
file-level shuffle), decoded and preprocessed in parallel Ray tasks of ``data.read_cpus`` CPUs
each, and fed to the trainer, which adds a local shuffle buffer
(``iter_torch_batches(local_shuffle_buffer_size=data.shuffle_buffer)``). Readers: imagefolder
files are fetched by the decode tasks themselves from the catalog's file list (no listing at
start); Parquet through ``read_parquet``; WebDataset tar shards through
``read_webdataset(decoder=None)``; latents through ``read_parquet``. Rows:

* imagefolder / parquet / webdataset: ``image`` float32 [C, R, R] in [-1, 1], ``label`` int64;
* latents: ``latent_mean`` / ``latent_std`` float16 [4, R/8, R/8] (orientation already chosen),
  ``label`` int64; the trainer draws ``speed.data.latents.sample_latents(mean, std, None,
  data.latent_scale, generator)`` for each batch. With ``repa.encoder`` set, also ``clean_image``
  uint8 [3, r, r], the stored clean image flipped exactly when the latent is the flipped one
  (latents encoded without ``prepare.keep_images=true`` are refused with that fix).

The digits format lives in memory and never goes through Ray Data: use
``speed.data.digits.load_digits`` and ``digits_batch_indices``.

The catalog (file list, labels, sizes) is ``speed.data.catalog.load_catalog``: read from beside
the data while the prefix is unchanged, rebuilt (and logged as such) otherwise; see docs/data.md.

Resume, and its limits. Open-source Ray Data has no mid-epoch iterator state, so a resumed run
rebuilds the epoch with ``skip_images`` (images already consumed in this epoch) and the pipeline
drops the epoch's leading *files* that lie wholly within them:

* imagefolder files are single images, so the skip is exact to the image; Parquet, tar and latent
  shards are skipped only when all their rows were consumed, and a partly consumed shard is read
  again from its start (at most one shard of replay);
* "consumed" is counted by the trainer, while Ray Data reads ahead: with ``ingest_options()``
  (``preserve_order=True``) rows reach the workers in file order, so the images the trainer had
  counted are exactly the epoch's first ones, apart from those sitting in the workers' shuffle
  and prefetch buffers (at most num_workers * (data.shuffle_buffer + data.prefetch_batches *
  batch) rows), which a resumed run does not see again in that epoch. Without preserve_order the
  window grows to the read tasks in flight;
* bad files that ``data.on_error=skip`` drops still count as images of the epoch
  (``dataset_size``), so an epoch with bad files yields fewer images than the size says, and a
  resume computed from images delivered replays as many files as were dropped before it.

The file order and the flips (a coin per (seed, epoch, file or row)) change from epoch to epoch.
Iterating a Dataset a second time replays it exactly, skip included: a trainer that holds one
Dataset for the whole run (as Ray Train does) should build it with
``num_epochs=epochs_to_cover(images_seen, images_still_to_train, dataset_size(cfg))``.

Bad input. With ``data.on_error=skip`` each decode task drops unreadable items and reports them to
one named actor, which logs the first ``data.max_logged_errors`` in full and then only counts;
``bad_input_report()`` returns the tally for the trainer to log. With ``raise`` the task fails
with the file's URI (and, for shards, the row or sample key) in the message. Labels out of range
and latent rows of the wrong shape always stop the run. Ray Data wraps such failures in its own
exception; ``data_error(exc)`` recovers the one-line message.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import ray

from speed import storage
from speed.config.schema import Config
from speed.data import records
from speed.data.batches import BadInput
from speed.data.catalog import DatasetCatalog, EpochPlan, load_catalog, plan_epoch
from speed.data.builtin import builtin_num_classes, builtin_num_images, is_builtin
from speed.data.latents import LATENT_COLUMNS, LATENT_IMAGE_COLUMN, check_latent_images

log = logging.getLogger("speed.data")

BAD_INPUT_ACTOR = "speed-bad-input-tally"
# Bounded read tasks keep the data read ahead of the trainer (and so the resume window) small, at a
# per-task overhead that is small next to decoding this many images.
FILES_PER_READ_TASK = 256
MIN_READ_TASKS = 4
IMAGE_DECODE_BATCH = 32
LATENT_DECODE_BATCH = 256

_catalogs: Dict[Tuple, DatasetCatalog] = {}


# --- bad-input tally -----------------------------------------------------------------------------


@ray.remote(num_cpus=0, max_restarts=-1)
class BadInputTally:
    """Counts the bad inputs that decode tasks drop, logging the first few in full."""

    def __init__(self, max_logged: int):
        from ray_jobs.common import setup_logging

        setup_logging()
        self.max_logged = max_logged
        self.count = 0
        self.examples: List[Dict[str, str]] = []
        self.next_summary = max(1, max_logged) * 2

    def configure(self, max_logged: int) -> None:
        self.max_logged = max_logged

    def record(self, items: List[Tuple[str, str]]) -> int:
        for source, reason in items:
            self.count += 1
            if len(self.examples) < self.max_logged:
                self.examples.append({"source": source, "reason": reason})
                log.warning("skipping bad input %s: %s (data.on_error=skip)", source, reason)
            elif self.count >= self.next_summary:
                self.next_summary *= 2
                log.warning("%d bad inputs skipped so far (latest: %s)", self.count, source)
        return self.count

    def report(self, reset: bool = False) -> Dict[str, Any]:
        result = {"bad_inputs": self.count, "examples": list(self.examples)}
        if reset:
            self.count, self.examples = 0, []
            self.next_summary = max(1, self.max_logged) * 2
        return result


def _tally(max_logged: int):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node, so losing a worker node does not reset the counts.
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    tally = BadInputTally.options(name=BAD_INPUT_ACTOR, get_if_exists=True, scheduling_strategy=here).remote(max_logged)
    tally.configure.remote(max_logged)  # an existing tally follows the newest data.max_logged_errors
    return tally


def bad_input_report(reset: bool = False) -> Dict[str, Any]:
    """{"bad_inputs": count, "examples": [{"source", "reason"}, ...]} over every pipeline this driver
    built (all epochs); zero when none was built."""
    try:
        actor = ray.get_actor(BAD_INPUT_ACTOR)
    except ValueError:
        return {"bad_inputs": 0, "examples": []}
    return ray.get(actor.report.remote(reset))


def _report_bad(tally, bad: List[BadInput]) -> None:
    if bad and tally is not None:
        # Waiting here (rare: only batches with bad items) makes the count complete by the time the
        # batch reaches the trainer.
        ray.get(tally.record.remote([(item.source, item.reason) for item in bad]))


_DATA_ERRORS = ("BadInputError", "LabelRangeError", "LatentShapeError", "DataFormatError")


def data_error(exc: BaseException) -> Optional[ValueError]:
    """The data-plane error (bad input under data.on_error=raise, label out of range, latent of the
    wrong shape) behind a failed Ray Data execution, as a plain ValueError with its one-line message;
    None for other failures.

    Ray Data re-raises task failures as RayTaskError(UserCodeException), which keeps the original
    only as traceback text, so the message is recovered from there.
    """
    text = str(exc)
    found = [(text.rfind(f"{name}: "), name) for name in _DATA_ERRORS]
    position, name = max(found)
    if position < 0:
        return None
    return ValueError(text[position + len(name) + 2 :].splitlines()[0])


# --- catalog and preflight -----------------------------------------------------------------------


def _catalog_key(cfg: Config) -> Tuple:
    data, settings = cfg.data, storage.s3_settings(cfg.storage)
    return (
        data.format, data.uri, data.class_index_uri, data.image_column, data.label_column, data.on_error,
        data.split, data.resolution, data.channels, cfg.model.num_classes, settings.endpoint_url, settings.region,
        settings.path_style,
    )


def wants_clean_images(cfg: Config) -> bool:
    """REPA on latents: the rows must carry the clean image beside the latent."""
    return cfg.data.format == "latents" and bool(cfg.repa.encoder)


def preflight_data(cfg: Config) -> Dict[str, Any]:
    """Check, before any cluster work, that ``data.uri`` is reachable and holds a usable dataset.

    Raises speed.storage.StorageError (endpoint, credentials, bucket, empty prefix) or ValueError
    (layout: class folders, class index, Parquet columns, shards, latent shapes, label range).
    Returns a summary: format, uri, images, files, classes, bad_files, catalog (reused | updated |
    built | scanned) and catalog_s (seconds to get it).
    """
    data = cfg.data
    if is_builtin(data.format):
        return {"format": data.format, "uri": None, "images": builtin_num_images(data.format), "files": 0,
                "classes": builtin_num_classes(data.format), "bad_files": 0}
    from speed.data.catalog import pattern_base

    storage.preflight(pattern_base(data.uri), cfg.storage, key="data.uri", nonempty=True)
    if data.class_index_uri:
        storage.preflight(data.class_index_uri, cfg.storage, key="data.class_index_uri")
    loaded = load_catalog(data, cfg.storage, num_classes=cfg.model.num_classes)
    found = loaded.catalog
    if wants_clean_images(cfg):
        check_latent_images(found.latent_meta, found.uri)
    _catalogs[_catalog_key(cfg)] = found
    summary = {
        "format": found.format,
        "uri": found.uri,
        "images": found.num_images,
        "files": len(found.files),
        "classes": found.num_classes_found,
        "bad_files": len(found.bad_files),
        "catalog": loaded.status,
        "catalog_s": round(loaded.seconds, 2),
    }
    where = f" at {loaded.location}" if loaded.location else ""
    if loaded.status == "reused":
        log.info("data.catalog: reused the catalog%s (%s)", where, loaded.reason)
    else:
        log.info("data.catalog: %s the catalog%s in %.1f s (%s)", loaded.status, where, loaded.seconds, loaded.reason)
    print(f"data: {found.num_images} images in {len(found.files)} files, {found.num_classes_found} classes "
          f"({found.format}, {found.uri}); catalog {loaded.status} in {loaded.seconds:.1f} s", file=sys.stderr,
          flush=True)
    return summary


def dataset_catalog(cfg: Config, refresh: bool = False) -> DatasetCatalog:
    """The scanned dataset (cached per data settings for this process; ``refresh`` rescans)."""
    key = _catalog_key(cfg)
    if refresh or key not in _catalogs:
        preflight_data(cfg)
    return _catalogs[key]


def dataset_size(cfg: Config) -> int:
    """Images per epoch (files the pipeline will try, including any it may drop as bad)."""
    if is_builtin(cfg.data.format):
        return builtin_num_images(cfg.data.format)
    return dataset_catalog(cfg).num_images


def num_classes_found(cfg: Config) -> int:
    """Distinct classes present in the data (class folders, distinct labels, or as encoded)."""
    if is_builtin(cfg.data.format):
        return builtin_num_classes(cfg.data.format)
    return dataset_catalog(cfg).num_classes_found


def ingest_options():
    """Ray Data execution options for training ingest: the current ones, with preserve_order on so
    rows reach the trainer in the epoch's file order (see the module docstring on resume). Ray
    Train replaces a dataset's own options with its DataConfig's, so pass them there:
    ``TorchTrainer(..., dataset_config=ray.train.DataConfig(execution_options=ingest_options()))``."""
    import copy

    from ray.data import DataContext

    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return options


# --- decode maps (run in Ray Data tasks): speed.data.records does the work ----------------------


def _decode_imagefolder(batch: Dict[str, np.ndarray], *, spec: Dict[str, Any], storage_cfg, tally) -> Dict[str, np.ndarray]:
    decode = records.DecodeSpec(**spec)
    fs, _ = storage.filesystem(decode.uri, storage_cfg)
    relatives = [str(r) for r in batch["file"]]
    out, bad = records.imagefolder_records(relatives, records.fetch_files(fs, decode.root, relatives), decode)
    _report_bad(tally, bad)
    return out


def _decode_parquet(table: pa.Table, *, spec: Dict[str, Any], tally) -> Dict[str, np.ndarray]:
    out, bad = records.parquet_records(table, records.DecodeSpec(**spec))
    _report_bad(tally, bad)
    return out


def _decode_webdataset(batch, *, spec: Dict[str, Any], tally) -> Dict[str, np.ndarray]:
    out, bad = records.webdataset_records(batch, records.DecodeSpec(**spec))
    _report_bad(tally, bad)
    return out


def _decode_latents(batch: Dict[str, np.ndarray], *, spec: Dict[str, Any]) -> Dict[str, np.ndarray]:
    return records.latent_records(batch, records.DecodeSpec(**spec))


# --- the training dataset ------------------------------------------------------------------------


def _without_secrets(storage_cfg):
    """Tasks get credentials from their environment, never through their arguments."""
    import dataclasses

    return dataclasses.replace(storage_cfg, access_key_id=None, secret_access_key=None)


def _read_tasks(num_files: int) -> int:
    return max(min(num_files, MIN_READ_TASKS), math.ceil(num_files / FILES_PER_READ_TASK))


def _epoch_dataset(cfg: Config, catalog: DatasetCatalog, seed: int, epoch: int, skip_images: int, tally) -> "ray.data.Dataset":
    """One epoch: its seeded file order minus the consumed leading files, read and decoded."""
    data = cfg.data
    plan: EpochPlan = plan_epoch(catalog, seed, epoch, skip_images)
    if not plan.files:
        raise ValueError(f"no files left to read in epoch {epoch} of '{catalog.uri}' after skipping {skip_images} images")
    if plan.files_skipped:
        log.info("epoch %d: resuming after %d files (%d images) of '%s'", epoch, plan.files_skipped,
                 plan.images_skipped, catalog.uri)
    fs, _ = storage.filesystem(catalog.uri, cfg.storage)
    paths = [catalog.file_path(relative) for relative in plan.files]
    read_cpus = float(data.read_cpus)
    clean = wants_clean_images(cfg)
    spec = records.decode_spec(data, catalog, num_classes=cfg.model.num_classes, seed=seed, epoch=epoch,
                               clean_images=clean).to_dict()
    decode = {"batch_size": IMAGE_DECODE_BATCH, "num_cpus": read_cpus}
    if data.format == "latents":
        columns = [*LATENT_COLUMNS, LATENT_IMAGE_COLUMN] if clean else list(LATENT_COLUMNS)
        return ray.data.read_parquet(
            paths, filesystem=fs, num_cpus=read_cpus, override_num_blocks=len(paths),
        ).select_columns(columns).map_batches(
            _decode_latents, fn_kwargs={"spec": spec}, batch_size=LATENT_DECODE_BATCH, batch_format="numpy",
            num_cpus=read_cpus,
        )
    if data.format == "imagefolder":
        # The catalog's file list, in blocks; the decode tasks fetch the files themselves, so no
        # start lists the prefix again and a vanished file is one bad record, not a failed read.
        chunks = np.array_split(np.asarray(plan.files, dtype=object), _read_tasks(len(plan.files)))
        return ray.data.from_arrow([pa.table({"file": pa.array(list(chunk), pa.string())}) for chunk in chunks]).map_batches(
            _decode_imagefolder, fn_kwargs={"spec": spec, "storage_cfg": _without_secrets(cfg.storage), "tally": tally},
            batch_format="numpy", **decode,
        )
    if data.format == "webdataset":
        return ray.data.read_webdataset(
            paths, filesystem=fs, decoder=None, num_cpus=read_cpus, override_num_blocks=len(paths),
        ).map_batches(_decode_webdataset, fn_kwargs={"spec": spec, "tally": tally}, batch_format="pandas", **decode)
    return ray.data.read_parquet(
        paths, filesystem=fs, include_paths=True, num_cpus=read_cpus, override_num_blocks=len(paths),
    ).select_columns([data.image_column, data.label_column, "path"]).map_batches(
        _decode_parquet, fn_kwargs={"spec": spec, "tally": tally}, batch_format="pyarrow", **decode,
    )


def epochs_to_cover(images_seen: int, images_to_train: int, size: int) -> int:
    """How many epochs, from the one ``images_seen`` falls in, hold the next ``images_to_train``
    images: the ``num_epochs`` for ``build_train_dataset`` that lets one pass finish a run."""
    return max(1, math.ceil((images_seen % size + images_to_train) / size))


def build_train_dataset(
    cfg: Config, *, seed: int, epoch: int = 0, skip_images: int = 0, num_epochs: int = 1
) -> "ray.data.Dataset":
    """``num_epochs`` consecutive epochs of ``data.format``, from ``epoch`` on, as one streaming Ray
    Dataset (see the module docstring for rows, resume and bad input).

    ``skip_images``: images of the first epoch already consumed (resume); whole leading files of
    that epoch's seeded order that they cover are not read again. Each epoch has its own file order
    and flips. Iterating a Dataset again replays it exactly (same epochs, same skip), so a trainer
    that makes one pass per run should pass ``num_epochs=epochs_to_cover(...)``; each epoch is its
    own read, so an imagefolder on object storage is listed once per epoch at build time.
    """
    data = cfg.data
    if is_builtin(data.format):
        raise ValueError(
            f"data.format={data.format} is served in memory, not by Ray Data: use speed.data.builtin.load_builtin and "
            "digits_batch_indices (or set data.format to imagefolder, parquet, webdataset or latents)"
        )
    if num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs} must be >= 1")
    catalog = dataset_catalog(cfg)
    if data.format == "latents":
        scale = float(catalog.latent_meta.get("scale_factor", data.latent_scale))
        if not math.isclose(scale, data.latent_scale, rel_tol=1e-6):
            log.warning("data.latent_scale=%s differs from the VAE's scale_factor=%s recorded in '%s'",
                        data.latent_scale, scale, catalog.uri)
    # Under data.on_error=raise the first bad input stops the run, so there is nothing to count.
    tally = _tally(data.max_logged_errors) if data.format != "latents" and data.on_error == "skip" else None
    epochs = [
        _epoch_dataset(cfg, catalog, seed, e, skip_images if e == epoch else 0, tally)
        for e in range(epoch, epoch + num_epochs)
    ]
    dataset = epochs[0].union(*epochs[1:]) if len(epochs) > 1 else epochs[0]
    dataset.context.execution_options.preserve_order = True
    return dataset
