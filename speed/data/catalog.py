"""What a dataset at ``data.uri`` holds: its files, images per file, classes and labels.

A scan lists the dataset once on the driver (pyarrow filesystems, so local folders and s3:// work
alike), checks its layout before any cluster work starts, and yields a ``DatasetCatalog`` from
which ``plan_epoch`` derives each epoch's seeded file order. Layout problems (unknown or empty
class folder, label out of range, missing Parquet column, latent shard of the wrong shape) raise
``DataFormatError`` naming the config key, the URI and the fix; unreadable files follow
``data.on_error``.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from speed import storage
from speed.config.schema import DataConfig, StorageConfig
from speed.data.latents import (
    LATENT_COLUMNS,
    LATENT_IMAGE_COLUMN,
    LATENT_META_NAME,
    check_latent_meta,
    expected_shard_names,
)
from speed.seeding import epoch_permutation

log = logging.getLogger("speed.data")

PREPARE_HINT = "python -m ray_jobs.prepare -c configs/prepare/digits.yaml"
ENCODE_HINT = "python -m ray_jobs.prepare -c configs/prepare/encode_imagenet.yaml"
# Parallel footer reads: object stores answer many small requests in parallel far faster than in turn.
_METADATA_THREADS = 16


class DataFormatError(ValueError):
    """A dataset whose layout or contents cannot be trained on; the message says what to fix."""


@dataclass
class DatasetCatalog:
    format: str  # imagefolder | parquet | latents
    uri: str  # the dataset root, as configured
    root: str  # the root as a path inside ``filesystem`` (what Ray Data readers take)
    files: List[str]  # paths relative to the root, '/'-separated, sorted
    rows: List[int]  # images per file, aligned with ``files``
    class_to_label: Dict[str, int] = field(default_factory=dict)  # wnid -> label (imagefolder, latents)
    num_classes_found: int = 0  # distinct labels present in the data
    bad_files: List[Tuple[str, str]] = field(default_factory=list)  # (uri, reason) dropped by the scan
    file_labels: Optional[List[np.ndarray]] = None  # parquet, webdataset: the labels of each file
    latent_meta: Optional[Dict[str, Any]] = None  # latents: the contents of _meta.json
    file_keys: Optional[List[List[str]]] = None  # webdataset: the sample keys of each shard
    sizes: Optional[List[int]] = None  # bytes per file (shard formats: what says a shard changed)

    @property
    def num_images(self) -> int:
        return int(sum(self.rows))

    def file_uri(self, relative: str) -> str:
        return storage.join(self.uri, relative)

    def file_path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)


def _hidden(relative: str) -> bool:
    # Ray Data's listings skip names starting with '.' or '_' too; both sides must agree.
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _list_entries(uri: str, storage_cfg: Optional[StorageConfig]) -> Tuple[pafs.FileSystem, str, List[Tuple[str, pafs.FileInfo]]]:
    fs, root = storage.filesystem(uri, storage_cfg)
    root = root.rstrip("/")
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise storage.StorageError(f"data.uri: '{uri}' does not exist; write the dataset there first ({PREPARE_HINT})")
    if info.type == pafs.FileType.File:
        raise DataFormatError(f"data.uri: '{uri}' is a file; give the dataset's folder or prefix")
    entries = []
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        relative = entry.path[len(root) :].lstrip("/")
        if relative and not _hidden(relative):
            entries.append((relative, entry))
    return fs, root, entries


def _file_entries(uri: str, storage_cfg: Optional[StorageConfig]) -> Tuple[pafs.FileSystem, str, List[Tuple[str, pafs.FileInfo]]]:
    """The files of a brace pattern (webdataset): (filesystem, the pattern's folder, entries)."""
    from speed.data.webdataset import expand_braces, pattern_root

    fs, root = storage.filesystem(pattern_root(uri), storage_cfg)
    root = root.rstrip("/")
    names = expand_braces(uri)
    infos = fs.get_file_info([storage.filesystem(name, storage_cfg)[1] for name in names])
    missing = [name for name, info in zip(names, infos) if info.type != pafs.FileType.File]
    if missing:
        raise storage.StorageError(
            f"data.uri: {len(missing)} of the {len(names)} shards of '{uri}' do not exist ({_examples(missing)}); "
            "fix the pattern or write the shards"
        )
    return fs, root, [(info.path[len(root) :].lstrip("/"), info) for info in infos]


def _examples(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(f"'{item}'" for item in list(items)[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# --- class index ---------------------------------------------------------------------------------


def parse_class_index(data: Any, source: str) -> Dict[str, int]:
    """{wnid: label} from JSON: either {wnid: int} or Keras' ImageNet form {"0": [wnid, name], ...}."""
    if not isinstance(data, dict) or not data:
        raise DataFormatError(f"data.class_index_uri: '{source}' must hold a non-empty JSON object {{wnid: label}}")
    mapping: Dict[str, int] = {}
    for key, value in data.items():
        if isinstance(value, bool):
            raise DataFormatError(f"data.class_index_uri: '{source}' maps '{key}' to {value!r}; labels are integers")
        if isinstance(value, int):
            mapping[str(key)] = value
        elif isinstance(value, list) and value and isinstance(value[0], str) and str(key).isdigit():
            mapping[value[0]] = int(key)
        else:
            raise DataFormatError(
                f"data.class_index_uri: '{source}' maps '{key}' to {value!r}; expected {{wnid: label}} "
                'or {"label": [wnid, name]}'
            )
    by_label: Dict[int, str] = {}
    for wnid, label in mapping.items():
        if label < 0:
            raise DataFormatError(f"data.class_index_uri: '{source}' gives '{wnid}' the negative label {label}")
        if label in by_label:
            raise DataFormatError(
                f"data.class_index_uri: '{source}' maps both '{by_label[label]}' and '{wnid}' to label {label}; "
                "each class needs its own label"
            )
        by_label[label] = wnid
    return mapping


def load_class_index(uri: str, storage_cfg: Optional[StorageConfig] = None) -> Dict[str, int]:
    try:
        text = storage.read_text(uri, storage_cfg)
    except storage.StorageError:
        raise storage.StorageError(
            f"data.class_index_uri: '{uri}' does not exist; fix the path or unset it to number the class "
            "folders in sorted order"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"data.class_index_uri: '{uri}' is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return parse_class_index(data, uri)


def _check_label_range(max_label: int, num_classes: Optional[int], where: str) -> None:
    if num_classes is not None and max_label >= num_classes:
        raise DataFormatError(
            f"{where} has label {max_label}, outside [0, model.num_classes={num_classes}); raise "
            "model.num_classes or fix the labels"
        )


# --- imagefolder ---------------------------------------------------------------------------------


def scan_imagefolder(data: DataConfig, storage_cfg: Optional[StorageConfig] = None, num_classes: Optional[int] = None) -> DatasetCatalog:
    """``<uri>/<wnid>/<image>``: one class per folder; files at the root (e.g. a class index) are ignored."""
    fs, root, entries = _list_entries(data.uri, storage_cfg)
    class_folders = set()
    files_by_class: Dict[str, List[str]] = {}
    sizes: Dict[str, int] = {}
    too_deep: List[str] = []
    for relative, entry in entries:
        parts = relative.split("/")
        if entry.type == pafs.FileType.Directory:
            if len(parts) == 1:
                class_folders.add(parts[0])
            else:
                too_deep.append(relative + "/")
        elif entry.type == pafs.FileType.File:
            if len(parts) == 2:
                class_folders.add(parts[0])
                files_by_class.setdefault(parts[0], []).append(relative)
                sizes[relative] = int(entry.size or 0)
            elif len(parts) > 2:
                too_deep.append(relative)
    if too_deep:
        raise DataFormatError(
            f"data.uri: '{data.uri}' has entries nested below the class folders ({_examples(sorted(too_deep))}); "
            "imagefolder expects <uri>/<wnid>/<name>.JPEG"
        )
    if not class_folders:
        raise DataFormatError(
            f"data.uri: '{data.uri}' has no class folders; imagefolder expects <uri>/<wnid>/<name>.JPEG "
            f"(write one with {PREPARE_HINT})"
        )
    empty = sorted(class_folders - set(files_by_class))
    if empty:
        raise DataFormatError(
            f"data.uri: class folder(s) {_examples(empty)} under '{data.uri}' are empty; add their images or remove them"
        )
    if data.class_index_uri:
        class_to_label = load_class_index(data.class_index_uri, storage_cfg)
        unknown = sorted(class_folders - set(class_to_label))
        if unknown:
            raise DataFormatError(
                f"data.uri: class folder(s) {_examples(unknown)} under '{data.uri}' are not in data.class_index_uri "
                f"'{data.class_index_uri}'; add them to the index or remove the folders"
            )
    else:
        class_to_label = {wnid: label for label, wnid in enumerate(sorted(class_folders))}
    used = {wnid: class_to_label[wnid] for wnid in class_folders}
    worst = max(used, key=used.get)
    _check_label_range(used[worst], num_classes, f"data.uri: class folder '{worst}' under '{data.uri}'")
    files = sorted(f for group in files_by_class.values() for f in group)
    return DatasetCatalog(
        format="imagefolder",
        uri=data.uri,
        root=root,
        files=files,
        rows=[1] * len(files),
        class_to_label=class_to_label,
        num_classes_found=len(class_folders),
        sizes=[sizes[f] for f in files],
    )


# --- parquet -------------------------------------------------------------------------------------


def image_bytes_column(column: pa.ChunkedArray | pa.Array, name: str = "image") -> pa.Array:
    """The encoded bytes of an image column that is plain binary or a struct {bytes, path}."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        return column.field("bytes")
    return column


def _check_image_type(kind: pa.DataType, uri: str, column: str) -> None:
    binary = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)
    if any(check(kind) for check in binary):
        return
    if pa.types.is_struct(kind):
        names = [kind.field(i).name for i in range(kind.num_fields)]
        if "bytes" in names and any(check(kind.field("bytes").type) for check in binary):
            return
    raise DataFormatError(
        f"data.image_column: column '{column}' of '{uri}' has type {kind}; expected binary (encoded image "
        "bytes) or a struct {bytes, path}"
    )


def _inspect_parquet(fs: pafs.FileSystem, path: str, uri: str, data: DataConfig) -> Tuple[int, np.ndarray]:
    """(rows, label column) of one Parquet shard after checking its columns."""
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        schema = parquet.schema_arrow
        for key, column in (("data.image_column", data.image_column), ("data.label_column", data.label_column)):
            if column not in schema.names:
                raise DataFormatError(
                    f"{key}: '{uri}' has no column '{column}' (columns: {', '.join(schema.names)}); set {key}"
                )
        _check_image_type(schema.field(data.image_column).type, uri, data.image_column)
        label_type = schema.field(data.label_column).type
        if not pa.types.is_integer(label_type):
            raise DataFormatError(
                f"data.label_column: column '{data.label_column}' of '{uri}' has type {label_type}; labels must be integers"
            )
        labels = parquet.read(columns=[data.label_column]).column(0)
        return parquet.metadata.num_rows, labels.to_numpy(zero_copy_only=False)


def _parquet_files(entries: List[Tuple[str, pafs.FileInfo]]) -> List[str]:
    return sorted(rel for rel, entry in entries if entry.type == pafs.FileType.File and rel.lower().endswith(".parquet"))


# Hugging Face `datasets` names its Parquet shards <split>-00000-of-00042.parquet, under data/.
_HF_SHARD = re.compile(r"^(?:data/)?(?P<split>[A-Za-z0-9_]+)-\d{5}-of-\d{5}\.parquet$")
_HF_SPLITS = ("train", "validation", "test")


def hugging_face_split(files: Sequence[str], split: str, uri: str) -> Optional[List[str]]:
    """The files of ``split`` when ``files`` (relative paths) follow the Hugging Face layout
    (``data/<split>-*.parquet``, or a split name of train/validation/test); None otherwise."""
    splits: Dict[str, List[str]] = {}
    for relative in files:
        match = _HF_SHARD.match(relative)
        if match:
            splits.setdefault(match.group("split"), []).append(relative)
    is_hf = any(f.startswith("data/") for f in files) or any(name in splits for name in _HF_SPLITS)
    if not splits or not is_hf:
        return None
    if split not in splits:
        raise DataFormatError(
            f"data.split: '{uri}' holds the Hugging Face splits {', '.join(sorted(splits))}, not '{split}'; set data.split"
        )
    return sorted(splits[split])


def scan_parquet(data: DataConfig, storage_cfg: Optional[StorageConfig] = None, num_classes: Optional[int] = None,
                 reuse: Optional[Dict[str, Tuple[int, np.ndarray]]] = None) -> DatasetCatalog:
    """Parquet shards under ``data.uri``; a Hugging Face dataset root (``data/train-*.parquet``)
    is read as its ``data.split`` split. ``reuse``: {file: (size, labels)} of files already
    inspected (an earlier catalog); only the others are opened."""
    fs, root, entries = _list_entries(data.uri, storage_cfg)
    candidates = _parquet_files(entries)
    if not candidates:
        raise DataFormatError(f"data.uri: no .parquet files under '{data.uri}'; write them first ({PREPARE_HINT} prepare.format=parquet)")
    candidates = hugging_face_split(candidates, data.split, data.uri) or candidates
    sizes = {rel: int(entry.size or 0) for rel, entry in entries}
    reuse = reuse or {}

    def inspect(relative: str):
        uri = storage.join(data.uri, relative)
        known = reuse.get(relative)
        if known is not None and known[0] == sizes[relative]:
            return relative, (len(known[1]), known[1]), None
        try:
            return relative, _inspect_parquet(fs, posixpath.join(root, relative), uri, data), None
        except DataFormatError:
            raise
        except Exception as exc:  # a corrupt footer or truncated file: data.on_error decides
            return relative, None, f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=_METADATA_THREADS) as pool:
        results = list(pool.map(inspect, candidates))
    files, rows, labels, bad = [], [], [], []
    for relative, found, error in results:
        uri = storage.join(data.uri, relative)
        if error is not None:
            _bad_file(data, f"cannot read Parquet file '{uri}' ({error})", uri, error, bad)
            continue
        count, file_labels = found
        files.append(relative)
        rows.append(count)
        labels.append(file_labels)
    if not files:
        raise DataFormatError(f"data.uri: none of the Parquet files under '{data.uri}' can be read")
    found = DatasetCatalog(format="parquet", uri=data.uri, root=root, files=files, rows=rows, bad_files=bad,
                           file_labels=labels, sizes=[sizes[f] for f in files])
    found.num_classes_found = check_file_labels(found, num_classes, "data.label_column")
    return found


def _bad_file(data: DataConfig, what: str, uri: str, reason: str, bad: List[Tuple[str, str]]) -> None:
    """data.on_error for a whole file the scan cannot read: stop naming it, or log and drop it."""
    if data.on_error == "raise":
        raise DataFormatError(f"data.on_error=raise: {what}; fix or remove it, or set data.on_error=skip")
    log.warning("skipping %s (data.on_error=skip)", what)
    bad.append((uri, reason))


def check_file_labels(catalog: DatasetCatalog, num_classes: Optional[int], key: str) -> int:
    """Check the per-file labels of a catalog against [0, num_classes); returns the distinct labels
    present (missing labels, NaN or None, are the decode step's to report)."""
    arrays = [np.asarray([np.nan if v is None else v for v in labels], dtype=np.float64)
              if isinstance(labels, list) else np.asarray(labels) for labels in (catalog.file_labels or [])]
    all_labels = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    present = all_labels[~np.isnan(all_labels)] if all_labels.dtype.kind == "f" else all_labels  # nulls -> NaN
    if present.size:
        if present.min() < 0:
            raise DataFormatError(
                f"{key}: '{catalog.uri}' has negative label {int(present.min())}; labels must be in [0, model.num_classes)"
            )
        _check_label_range(int(present.max()), num_classes, f"{key}: '{catalog.uri}'")
    return int(np.unique(present).size)


# --- webdataset ----------------------------------------------------------------------------------


def scan_webdataset(data: DataConfig, storage_cfg: Optional[StorageConfig] = None, num_classes: Optional[int] = None,
                    reuse: Optional[Dict[str, Tuple[int, List[str], List[Optional[int]]]]] = None) -> DatasetCatalog:
    """The ``.tar`` shards under ``data.uri`` (a prefix, or a brace pattern), each read once for its
    sample keys and labels (a tar has no index). ``reuse``: {shard: (size, keys, labels)} from an
    earlier catalog; shards of the same size are not read again."""
    from speed.data.webdataset import has_braces, scan_shard

    if has_braces(data.uri):
        fs, root, entries = _file_entries(data.uri, storage_cfg)
    else:
        fs, root, entries = _list_entries(data.uri, storage_cfg)
    candidates = sorted(rel for rel, entry in entries if entry.type == pafs.FileType.File and rel.lower().endswith(".tar"))
    if not candidates:
        raise DataFormatError(
            f"data.uri: no .tar shards under '{data.uri}'; give the prefix holding them, a brace pattern like "
            "s3://bucket/train-{000000..001023}.tar, or write them with python -m ray_jobs.prepare prepare.task=convert "
            "prepare.format=webdataset"
        )
    sizes = {rel: int(entry.size or 0) for rel, entry in entries}
    reuse = reuse or {}

    def inspect(relative: str):
        known = reuse.get(relative)
        if known is not None and known[0] == sizes[relative]:
            return known[1], known[2], None, None
        try:
            with fs.open_input_stream(posixpath.join(root, relative)) as stream:
                index = scan_shard(stream, data.label_column)
        except OSError as exc:
            return [], [], f"{type(exc).__name__}: {exc}", None
        return index.keys, index.labels, index.error, index.last_key

    with ThreadPoolExecutor(max_workers=_METADATA_THREADS) as pool:
        results = list(pool.map(inspect, candidates))
    base = pattern_base(data.uri)
    files, rows, labels, keys, bad = [], [], [], [], []
    for relative, (shard_keys, shard_labels, error, last_key) in zip(candidates, results):
        uri = storage.join(base, relative)
        if error is not None:
            after = f" after sample '{last_key}'" if last_key else ""
            _bad_file(data, f"cannot read shard '{uri}'{after} ({error})", uri, error, bad)
            continue
        if not shard_keys:
            _bad_file(data, f"shard '{uri}' holds no samples", uri, "no samples", bad)
            continue
        files.append(relative)
        rows.append(len(shard_keys))
        keys.append(list(shard_keys))
        labels.append(list(shard_labels))
    if not files:
        raise DataFormatError(f"data.uri: none of the shards of '{data.uri}' can be read")
    found = DatasetCatalog(format="webdataset", uri=base, root=root, files=files, rows=rows, bad_files=bad,
                           file_labels=labels, file_keys=keys, sizes=[sizes[f] for f in files])
    found.num_classes_found = check_file_labels(found, num_classes, "data.uri (the .cls / .json labels)")
    return found


def pattern_base(uri: str) -> str:
    """The folder a dataset's relative file names are relative to (a brace pattern's folder)."""
    from speed.data.webdataset import has_braces, pattern_root

    return pattern_root(uri) if has_braces(uri) else uri


# --- latents -------------------------------------------------------------------------------------


def read_latent_meta(uri: str, storage_cfg: Optional[StorageConfig] = None) -> Optional[Dict[str, Any]]:
    meta_uri = storage.join(uri, LATENT_META_NAME)
    if not storage.exists(meta_uri, storage_cfg):
        return None
    try:
        return json.loads(storage.read_text(meta_uri, storage_cfg))
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"'{meta_uri}' is not valid JSON ({exc.msg}); rerun {ENCODE_HINT}") from None


def scan_latents(data: DataConfig, storage_cfg: Optional[StorageConfig] = None, num_classes: Optional[int] = None,
                 reuse: Optional[Dict[str, Tuple[int, int]]] = None) -> DatasetCatalog:
    """Latent shards as _meta.json lists them. ``reuse``: {shard: (size, rows)} from an earlier
    catalog; shards of the same size are not opened again."""
    fs, root, entries = _list_entries(data.uri, storage_cfg)
    sizes = {rel: int(entry.size or 0) for rel, entry in entries}
    reuse = reuse or {}
    meta = read_latent_meta(data.uri, storage_cfg)
    if meta is None:
        raise DataFormatError(
            f"data.uri: no {LATENT_META_NAME} under '{data.uri}'; latents are written by {ENCODE_HINT}"
        )
    check_latent_meta(meta, data.uri, resolution=data.resolution, channels=data.channels)
    if not meta.get("complete"):
        raise DataFormatError(
            f"data.uri: the latents under '{data.uri}' are incomplete (the encode job has not finished); "
            f"rerun {ENCODE_HINT} with prepare.output_uri={data.uri} (it resumes)"
        )
    expected = expected_shard_names(int(meta["num_shards"]))
    present = set(_parquet_files(entries))
    missing = [name for name in expected if name not in present]
    if missing:
        raise DataFormatError(
            f"data.uri: latent shard(s) {_examples(missing)} under '{data.uri}' are missing; rerun {ENCODE_HINT} "
            f"with prepare.output_uri={data.uri} to rewrite them"
        )

    def inspect(relative: str) -> int:
        uri = storage.join(data.uri, relative)
        known = reuse.get(relative)
        if known is not None and known[0] == sizes[relative]:
            return known[1]
        with fs.open_input_file(posixpath.join(root, relative)) as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            wanted = (*LATENT_COLUMNS, LATENT_IMAGE_COLUMN) if meta.get("images") else LATENT_COLUMNS
            lacking = [column for column in wanted if column not in names]
            if lacking:
                raise DataFormatError(
                    f"latent shard '{uri}' lacks column(s) {', '.join(lacking)}; it was not written by the encode "
                    f"job: delete it and rerun {ENCODE_HINT}"
                )
            return parquet.metadata.num_rows

    with ThreadPoolExecutor(max_workers=_METADATA_THREADS) as pool:
        rows = list(pool.map(inspect, expected))
    class_to_label = {str(k): int(v) for k, v in (meta.get("class_index") or {}).items()}
    max_label = int(meta.get("max_label", -1))
    if max_label >= 0:
        _check_label_range(max_label, num_classes, f"data.uri: the latents under '{data.uri}'")
    return DatasetCatalog(
        format="latents",
        uri=data.uri,
        root=root,
        files=list(expected),
        rows=rows,
        class_to_label=class_to_label,
        num_classes_found=int(meta.get("num_classes_found", max_label + 1)),
        latent_meta=meta,
        sizes=[sizes[name] for name in expected],
    )


def scan_dataset(data: DataConfig, storage_cfg: Optional[StorageConfig] = None, num_classes: Optional[int] = None) -> DatasetCatalog:
    """Scan and check the dataset that ``data`` describes (any format but digits)."""
    scanners = {"imagefolder": scan_imagefolder, "parquet": scan_parquet, "webdataset": scan_webdataset,
                "latents": scan_latents}
    if data.format not in scanners:
        raise DataFormatError(
            f"data.format={data.format!r} has no files to scan; use one of {', '.join(scanners)} (digits lives in memory)"
        )
    if not data.uri:
        raise DataFormatError(f"data.uri is empty; data.format={data.format} needs a local folder or s3://bucket/prefix")
    return scanners[data.format](data, storage_cfg, num_classes)


# --- the stored catalog --------------------------------------------------------------------------
#
# Listing 1.28M objects takes minutes of S3 requests, and reading every tar or Parquet footer
# more; the catalog is written once beside the data (``_speed_catalog.parquet``: hidden from
# every listing, like Ray Data's) and reused while the prefix is unchanged.

CATALOG_NAME = "_speed_catalog.parquet"
CATALOG_VERSION = 1
_CATALOG_META_KEY = b"speed_catalog"


@dataclass
class CatalogLoad:
    catalog: DatasetCatalog
    status: str  # reused | updated | built | scanned (data.catalog=disabled)
    reason: str  # why it was (re)built, or what was reused
    seconds: float
    location: Optional[str]


def catalog_location(data: DataConfig) -> str:
    return data.catalog_uri or storage.join(pattern_base(data.uri), CATALOG_NAME)


def _catalog_settings(data: DataConfig) -> Dict[str, Any]:
    """The data settings a catalog's contents depend on; another value means another catalog."""
    return {"format": data.format, "uri": data.uri, "class_index_uri": data.class_index_uri,
            "image_column": data.image_column, "label_column": data.label_column, "split": data.split}


def _top_level(data: DataConfig, storage_cfg: Optional[StorageConfig]) -> List[str]:
    """The names directly under an imagefolder root (one delimited listing: about 1 request per
    1,000 class folders), hidden names excepted."""
    fs, root = storage.filesystem(data.uri, storage_cfg)
    root = root.rstrip("/")
    names = []
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True)):
        name = entry.path[len(root) :].strip("/")
        if name and not _hidden(name):
            names.append(name + ("/" if entry.type == pafs.FileType.Directory else ""))
    return sorted(names)


def _label_list(labels: Any) -> List[Optional[int]]:
    values = labels.tolist() if isinstance(labels, np.ndarray) else list(labels)
    return [None if v is None or (isinstance(v, float) and np.isnan(v)) else int(v) for v in values]


def _label_array(values: List[Optional[int]]) -> np.ndarray:
    if any(v is None for v in values):
        return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    return np.asarray(values, dtype=np.int64)


def catalog_to_bytes(catalog: DatasetCatalog, settings: Dict[str, Any], signature: Any = None) -> bytes:
    """The catalog as one Parquet file: a row per data file (name, rows, size, labels, keys) and the
    rest as JSON in the schema metadata."""
    import io

    columns: Dict[str, Any] = {
        "file": pa.array(catalog.files, pa.string()),
        "rows": pa.array(catalog.rows, pa.int64()),
        "size": pa.array(catalog.sizes if catalog.sizes is not None else [None] * len(catalog.files), pa.int64()),
    }
    if catalog.file_labels is not None:
        columns["labels"] = pa.array([_label_list(labels) for labels in catalog.file_labels], pa.list_(pa.int64()))
    if catalog.file_keys is not None:
        columns["keys"] = pa.array(catalog.file_keys, pa.list_(pa.string()))
    meta = {
        "version": CATALOG_VERSION, "settings": settings, "signature": signature, "format": catalog.format,
        "uri": catalog.uri, "class_to_label": catalog.class_to_label, "num_classes_found": catalog.num_classes_found,
        "bad_files": [list(item) for item in catalog.bad_files], "latent_meta": catalog.latent_meta,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    table = pa.table(columns).replace_schema_metadata({_CATALOG_META_KEY: json.dumps(meta).encode("utf-8")})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def catalog_from_bytes(blob: bytes, root: str) -> Tuple[DatasetCatalog, Dict[str, Any]]:
    import io

    table = pq.read_table(io.BytesIO(blob))
    meta = json.loads((table.schema.metadata or {})[_CATALOG_META_KEY])
    names = table.column_names
    catalog = DatasetCatalog(
        format=meta["format"], uri=meta["uri"], root=root, files=table.column("file").to_pylist(),
        rows=table.column("rows").to_pylist(), class_to_label={k: int(v) for k, v in meta["class_to_label"].items()},
        num_classes_found=int(meta["num_classes_found"]), bad_files=[tuple(item) for item in meta["bad_files"]],
        latent_meta=meta.get("latent_meta"), sizes=table.column("size").to_pylist(),
    )
    if "labels" in names:
        lists = table.column("labels").to_pylist()
        catalog.file_labels = [list(v) for v in lists] if meta["format"] == "webdataset" else [_label_array(v) for v in lists]
    if "keys" in names:
        catalog.file_keys = table.column("keys").to_pylist()
    return catalog, meta


def _read_stored(data: DataConfig, storage_cfg: Optional[StorageConfig], location: str, root: str):
    """(catalog, meta) stored at ``location``, or (None, why not)."""
    try:
        blob = storage.read_bytes(location, storage_cfg)
    except (storage.StorageError, OSError):
        return None, "no catalog yet"
    try:
        catalog, meta = catalog_from_bytes(blob, root)
    except Exception as exc:  # a catalog from another version or a damaged file: rebuild it
        return None, f"the stored catalog is unreadable ({type(exc).__name__})"
    if meta.get("version") != CATALOG_VERSION:
        return None, f"the stored catalog has version {meta.get('version')}, not {CATALOG_VERSION}"
    if meta.get("settings") != _catalog_settings(data):
        changed = sorted(k for k, v in _catalog_settings(data).items() if (meta.get("settings") or {}).get(k) != v)
        return None, f"data.{', data.'.join(changed)} changed since it was written"
    return (catalog, meta), ""


def _reuse_entries(catalog: DatasetCatalog) -> Dict[str, Any]:
    sizes = catalog.sizes or [None] * len(catalog.files)
    if catalog.format == "parquet":
        return {f: (sizes[i], catalog.file_labels[i]) for i, f in enumerate(catalog.files)}
    if catalog.format == "webdataset":
        return {f: (sizes[i], catalog.file_keys[i], catalog.file_labels[i]) for i, f in enumerate(catalog.files)}
    if catalog.format == "latents":
        return {f: (sizes[i], catalog.rows[i]) for i, f in enumerate(catalog.files)}
    return {}


def _check_reused(catalog: DatasetCatalog, data: DataConfig, storage_cfg: Optional[StorageConfig],
                  num_classes: Optional[int]) -> None:
    """What a scan would have checked, applied to a stored catalog: error policy and labels."""
    if catalog.bad_files and data.on_error == "raise":
        uri, reason = catalog.bad_files[0]
        raise DataFormatError(
            f"data.on_error=raise: cannot read '{uri}' ({reason}); fix or remove it, or set data.on_error=skip"
        )
    if catalog.format == "imagefolder":
        folders = {f.split("/", 1)[0] for f in catalog.files}
        worst = max(folders, key=lambda wnid: catalog.class_to_label[wnid])
        _check_label_range(catalog.class_to_label[worst], num_classes,
                           f"data.uri: class folder '{worst}' under '{data.uri}'")
    elif catalog.format == "latents":
        max_label = int((catalog.latent_meta or {}).get("max_label", -1))
        if max_label >= 0:
            _check_label_range(max_label, num_classes, f"data.uri: the latents under '{data.uri}'")
    else:
        check_file_labels(catalog, num_classes, "data.label_column" if catalog.format == "parquet" else "data.uri")


def load_catalog(data: DataConfig, storage_cfg: Optional[StorageConfig] = None,
                 num_classes: Optional[int] = None) -> CatalogLoad:
    """The dataset's catalog: the stored one while the prefix is unchanged, else a scan (reusing
    what it can), written back for the next start. ``data.catalog`` chooses (see DataConfig).

    Unchanged means, for imagefolder, the same names directly under ``data.uri`` (a new class
    folder is seen; images added inside a class folder are not: set data.catalog=rebuild after
    changing them); for shard formats, the same shard names and sizes (a changed shard is read
    again, the others are not).
    """
    started = time.perf_counter()
    if data.catalog == "disabled":
        found = scan_dataset(data, storage_cfg, num_classes)
        return CatalogLoad(found, "scanned", "data.catalog=disabled", time.perf_counter() - started, None)
    location = catalog_location(data)
    _, root = storage.filesystem(pattern_base(data.uri), storage_cfg)
    root = root.rstrip("/")
    stored, why = (None, "data.catalog=rebuild")
    if data.catalog == "auto":
        stored, why = _read_stored(data, storage_cfg, location, root)
    if data.format == "latents" and stored is not None:
        meta = read_latent_meta(data.uri, storage_cfg)
        if meta != stored[0].latent_meta:
            stored, why = None, f"{LATENT_META_NAME} changed since it was written"
    signature = None
    if data.format == "imagefolder":
        signature = _top_level(data, storage_cfg)
        if stored is not None:
            catalog, meta = stored
            if meta.get("signature") == signature and (
                not data.class_index_uri or load_class_index(data.class_index_uri, storage_cfg) == catalog.class_to_label
            ):
                _check_reused(catalog, data, storage_cfg, num_classes)
                return CatalogLoad(catalog, "reused", f"{len(catalog.files)} files", time.perf_counter() - started,
                                   location)
            why = "the folders under data.uri changed since it was written"
        found = scan_dataset(data, storage_cfg, num_classes)
        status = "built"
    else:
        reuse = _reuse_entries(stored[0]) if stored is not None else None
        scanners = {"parquet": scan_parquet, "webdataset": scan_webdataset, "latents": scan_latents}
        if data.format not in scanners:
            found = scan_dataset(data, storage_cfg, num_classes)  # raises the unknown format's error
        elif not data.uri:
            raise DataFormatError(f"data.uri is empty; data.format={data.format} needs a local folder or s3://bucket/prefix")
        else:
            found = scanners[data.format](data, storage_cfg, num_classes, reuse=reuse)
        if stored is not None:
            previous = stored[0]
            same = (previous.files == found.files and previous.sizes == found.sizes
                    and [u for u, _ in previous.bad_files] == [u for u, _ in found.bad_files])
            if same:
                return CatalogLoad(found, "reused", f"{len(found.files)} shards unchanged",
                                   time.perf_counter() - started, location)
            old = dict(zip(previous.files, previous.sizes or []))
            changed = sum(1 for f, size in zip(found.files, found.sizes or []) if old.get(f) != size)
            removed = len(set(previous.files) - set(found.files))
            why = f"{changed} shard(s) new or changed, {removed} removed; the others were not read again"
            status = "updated"
        else:
            status = "built"
    try:
        storage.write_bytes(location, catalog_to_bytes(found, _catalog_settings(data), signature), storage_cfg)
    except Exception as exc:  # a read-only bucket: train anyway, and say how to keep the catalog
        log.warning("data.catalog: cannot write the catalog to '%s' (%s); the next start lists the data again. "
                    "Set data.catalog_uri to a writable place, or data.catalog=disabled", location,
                    storage.redact(f"{type(exc).__name__}: {exc}", storage_cfg))
        location = None
    return CatalogLoad(found, status, why, time.perf_counter() - started, location)


# --- epoch plans ---------------------------------------------------------------------------------


@dataclass
class EpochPlan:
    files: List[str]  # relative paths, in this epoch's seeded order, leading consumed files removed
    rows: List[int]
    images_skipped: int  # images in the files removed
    files_skipped: int


def plan_epoch(catalog: DatasetCatalog, seed: int, epoch: int, skip_images: int = 0) -> EpochPlan:
    """The epoch's file order (a seeded permutation of the catalog's files) minus leading files
    whose images are all among the first ``skip_images`` images of the epoch.

    A file that is only partly consumed is read again from its start: resume is at file
    granularity (exact for imagefolder, where a file is one image).
    """
    total = catalog.num_images
    if skip_images < 0 or (total and skip_images >= total):
        raise ValueError(
            f"skip_images={skip_images} must be in [0, {total}) (the images in one epoch of '{catalog.uri}'); "
            "pass the epoch number and the images seen within that epoch"
        )
    order = epoch_permutation(len(catalog.files), seed, epoch).tolist()
    files = [catalog.files[i] for i in order]
    rows = [catalog.rows[i] for i in order]
    skipped_files, skipped_images = 0, 0
    while skipped_files < len(files) and skipped_images + rows[skipped_files] <= skip_images:
        skipped_images += rows[skipped_files]
        skipped_files += 1
    return EpochPlan(files[skipped_files:], rows[skipped_files:], skipped_images, skipped_files)
