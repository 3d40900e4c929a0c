"""The in-training evaluator of any small pixel dataset: a classifier trained on that dataset.

Inception features mean little on 8x8 or 16x16 images, so the CPU configs judge samples with a
small CNN trained on the dataset being trained: its 128-d penultimate features give an FID and
precision/recall against a held-out reference split of the same dataset, and its predictions say
how often a conditional sample is recognised as its class. The metric is named after the dataset,
``fid_<dataset>`` (``fid_digits``, ``fid_patches``, ``fid_<imagefolder's folder name>``; see
``dataset_name``), so a number always says what it was measured against.

The recipe, fixed and seeded (``EVALUATOR_VERSION``):

- the images: all of an in-memory dataset (``digits``, ``patches``), or a seeded, class-stratified
  subset of at most ``MAX_IMAGES`` files of an imagefolder, at ``data.resolution`` and
  ``data.channels`` as training sees them, then area-downsampled to at most ``MAX_INPUT_RESOLUTION``;
- the split: per class, a seeded ``HELDOUT_FRACTION`` is held out. The classifier never trains on
  it; its features are the FID / precision-recall reference and it measures the held-out accuracy.
  The rest trains the classifier (1-pixel random shifts; flips too where the dataset flips);
- the result, classifier and reference features, is cached in-process and as one safetensors file
  per dataset, ``<cache>/eval-<dataset>-<key>.safetensors``, where ``key`` hashes the dataset's
  identity (format, uri, resolution, channels, classes, the file list and sizes of an imagefolder,
  the built-in dataset's version) and the recipe: two datasets never share a cache, and a changed
  folder is retrained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from speed import storage
from speed.config.schema import DataConfig, StorageConfig
from speed.evaluate.digits import feature_metrics
from speed.evaluate.precision_recall import manifold_radii
from speed.evaluate.stats import feature_statistics

log = logging.getLogger(__name__)

EVALUATOR_VERSION = 1  # bump when the architecture, split or training recipe changes
EVALUATOR_SEED = 0
HELDOUT_FRACTION = 0.3
MAX_IMAGES = 6000
MAX_INPUT_RESOLUTION = 32
FEATURE_DIM = 128
PR_NEIGHBOURS = 3
TARGET_STEPS = 500  # optimizer steps of classifier training (epochs follow from the dataset size)
_BATCH = 64
_LR = 2e-3
_METADATA_KEY = "speed_dataset_evaluator"
IN_MEMORY_FORMATS = ("digits", "patches")
EVAL_FORMATS = (*IN_MEMORY_FORMATS, "imagefolder")

ImagesLike = Union[np.ndarray, torch.Tensor]
LabelsLike = Optional[Union[Sequence[int], np.ndarray, torch.Tensor]]


# --- naming --------------------------------------------------------------------------------------


def dataset_name(data: DataConfig) -> str:
    """The dataset's name in metric names: the built-in format (``digits``, ``patches``), else the
    last part of ``data.uri`` in lower case with other characters as ``_`` (``.../my-faces/`` ->
    ``my_faces``)."""
    if data.format in IN_MEMORY_FORMATS or not data.uri:
        return data.format
    tail = data.uri.rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^a-z0-9]+", "_", tail.lower()).strip("_")
    return name or data.format


def fid_metric_name(data: DataConfig) -> str:
    """The FID key the in-training evaluation logs for ``data``: ``fid_<dataset_name>``."""
    return f"fid_{dataset_name(data)}"


def supports_in_training_eval(data: DataConfig) -> bool:
    return data.format in EVAL_FORMATS


# --- the dataset's images ------------------------------------------------------------------------


@dataclass
class EvalData:
    """What the evaluator is trained on: a name, an identity (what the cache key hashes) and a
    loader of (images float32 [N, C, R, R] in [-1, 1], labels int64 [N])."""

    name: str
    identity: Dict[str, Any]
    load: Callable[[], Tuple[torch.Tensor, torch.Tensor]]
    flip: bool = False  # augment the classifier's training with horizontal flips
    num_classes: Optional[int] = None

    @property
    def key(self) -> str:
        recipe = {"evaluator": EVALUATOR_VERSION, "seed": EVALUATOR_SEED, "heldout": HELDOUT_FRACTION,
                  "max_images": MAX_IMAGES, "max_resolution": MAX_INPUT_RESOLUTION, "flip": self.flip,
                  "num_classes": self.num_classes}
        blob = json.dumps({"data": self.identity, "recipe": recipe}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stratified_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``limit`` items, the same share of every class (seeded)."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    fraction = limit / len(labels)
    chosen = []
    for c in np.unique(labels):
        members = order[labels[order] == c]
        chosen.append(members[: max(1, int(round(len(members) * fraction)))])
    return np.sort(np.concatenate(chosen)[: max(limit, len(chosen))])


def eval_data_from_config(data: DataConfig, storage_cfg: Optional[StorageConfig] = None,
                          num_classes: Optional[int] = None) -> EvalData:
    """The evaluator's data for ``data.format`` digits, patches or imagefolder (ValueError otherwise)."""
    base = {"format": data.format, "resolution": int(data.resolution), "channels": int(data.channels)}
    name = dataset_name(data)
    if data.format == "digits":
        from speed.data.digits import load_digits

        return EvalData(name, {**base, "version": 1}, lambda: load_digits(data.resolution, data.channels),
                        flip=False, num_classes=num_classes)
    if data.format == "patches":
        from speed.data.patches import PATCHES_VERSION, load_patches

        return EvalData(name, {**base, "version": PATCHES_VERSION},
                        lambda: load_patches(data.resolution, data.channels), flip=data.random_flip,
                        num_classes=num_classes)
    if data.format == "imagefolder":
        return _imagefolder_data(data, storage_cfg, num_classes, base, name)
    raise ValueError(
        f"data.format={data.format}: the in-training evaluator trains its classifier on "
        f"{', '.join(EVAL_FORMATS)} data; set train.eval_every=0 (and evaluate with python -m ray_jobs.evaluate)"
    )


def _imagefolder_data(data: DataConfig, storage_cfg: Optional[StorageConfig], num_classes: Optional[int],
                      base: Dict[str, Any], name: str) -> EvalData:
    from speed.data.catalog import scan_imagefolder

    catalog = scan_imagefolder(data, storage_cfg, num_classes)
    labels = np.asarray([catalog.class_to_label[f.split("/", 1)[0]] for f in catalog.files], dtype=np.int64)
    listing = hashlib.sha256(json.dumps([catalog.files, catalog.sizes, labels.tolist()]).encode()).hexdigest()
    identity = {**base, "uri": data.uri, "decode": data.decode, "files": len(catalog.files), "listing": listing}
    chosen = _stratified_subset(labels, MAX_IMAGES, EVALUATOR_SEED)

    def load() -> Tuple[torch.Tensor, torch.Tensor]:
        from speed.data.transforms import load_and_crop, to_model_tensor

        arrays, kept = [], []
        for i in chosen:
            uri = catalog.file_uri(catalog.files[i])
            try:
                arrays.append(load_and_crop(storage.read_bytes(uri, storage_cfg), data.resolution, data.channels,
                                            data.decode))
            except Exception as exc:  # a corrupt file: training skips it too (data.on_error)
                if data.on_error == "raise":
                    raise ValueError(f"data.uri: cannot read '{uri}': {exc}") from exc
                continue
            kept.append(labels[i])
        if len(kept) < 4:
            raise ValueError(f"data.uri: too few readable images under '{data.uri}' to train the evaluator")
        return to_model_tensor(np.stack(arrays)), torch.tensor(kept, dtype=torch.long)

    return EvalData(name, identity, load, flip=data.random_flip, num_classes=num_classes)


def eval_data_from_arrays(name: str, images: torch.Tensor, labels: torch.Tensor, flip: bool = False,
                          num_classes: Optional[int] = None) -> EvalData:
    """In-memory images (float [N, C, R, R] in [-1, 1]) as evaluator data; identity = their content."""
    digest = hashlib.sha256()
    digest.update(images.detach().cpu().float().contiguous().numpy().tobytes())
    digest.update(labels.detach().cpu().long().contiguous().numpy().tobytes())
    identity = {"format": "arrays", "shape": list(images.shape), "sha256": digest.hexdigest()}
    return EvalData(name, identity, lambda: (images, labels), flip=flip, num_classes=num_classes)


# --- the classifier ------------------------------------------------------------------------------


def input_resolution(resolution: int) -> int:
    return min(int(resolution), MAX_INPUT_RESOLUTION)


class DatasetClassifier(nn.Module):
    """[N, C, R, R] -> classes, R = ``input_resolution(data.resolution)``. Buffers hold the held-out
    accuracy and the reference (held-out) features."""

    def __init__(self, channels: int, resolution: int, num_classes: int):
        super().__init__()
        self.channels, self.resolution, self.num_classes = int(channels), int(resolution), int(num_classes)
        width = 32
        layers: list = [nn.Conv2d(self.channels, width, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        size = self.resolution
        while size > 4:
            layers += [nn.MaxPool2d(2), nn.Conv2d(width, min(2 * width, 128), 3, padding=1), nn.ReLU()]
            width, size = min(2 * width, 128), size // 2
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(width * 16, FEATURE_DIM), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(FEATURE_DIM, self.num_classes)
        self.register_buffer("heldout_accuracy", torch.zeros(()))
        self.register_buffer("reference_features", torch.zeros(0, FEATURE_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def to_input(images: ImagesLike, channels: int, resolution: int) -> torch.Tensor:
    """Images -> float32 [N, channels, resolution, resolution] in [-1, 1].

    uint8 images are taken as 0..255 and float images as [-1, 1]; NHWC or NCHW is told apart by
    which axis holds 1 or 3 channels (uint8 defaults to NHWC, float to NCHW). RGB becomes grey by
    averaging and grey becomes RGB by repeating; other sizes are resized (area when shrinking).
    """
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    x = x.detach().cpu()
    is_uint8 = x.dtype == torch.uint8
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C] or [N, C, H, W], got shape {tuple(x.shape)}")
    channels_last, channels_first = x.shape[-1] in (1, 3), x.shape[1] in (1, 3)
    if channels_last and (not channels_first or is_uint8):
        x = x.permute(0, 3, 1, 2)
    x = x.float()
    if is_uint8:
        x = x / 127.5 - 1.0
    if x.shape[1] != channels:
        x = x.mean(dim=1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    if x.shape[-2:] != (resolution, resolution):
        shrink = x.shape[-1] > resolution
        x = F.interpolate(x, size=(resolution, resolution), mode="area" if shrink else "bilinear",
                          **({} if shrink else {"align_corners": False}))
    return x.clamp(-1.0, 1.0).contiguous()


def split_indices(labels: torch.Tensor, seed: int = EVALUATOR_SEED) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices: per class a seeded ``HELDOUT_FRACTION`` (at least one) is held out."""
    generator = torch.Generator().manual_seed(seed)
    train, held = [], []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = max(1, int(round(len(members) * HELDOUT_FRACTION))) if len(members) > 1 else 0
        held.append(members[:count])
        train.append(members[count:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(held)).values


def _augment(batch: torch.Tensor, generator: torch.Generator, flip: bool) -> torch.Tensor:
    size = batch.shape[-1]
    padded = F.pad(batch, (1, 1, 1, 1), mode="replicate")
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    batch = padded[:, :, dy : dy + size, dx : dx + size]
    if flip:
        mask = torch.rand(batch.shape[0], generator=generator) < 0.5
        batch = torch.where(mask[:, None, None, None], batch.flip(-1), batch)
    return batch


def train_dataset_classifier(data: EvalData, seed: int = EVALUATOR_SEED) -> DatasetClassifier:
    """Train on the non-held-out images; keep the held-out accuracy and features."""
    images, labels = data.load()
    labels = labels.long()
    num_classes = int(data.num_classes or int(labels.max()) + 1)
    if int(labels.max()) >= num_classes:
        raise ValueError(f"dataset '{data.name}' has label {int(labels.max())}, but model.num_classes={num_classes}")
    resolution = input_resolution(images.shape[-1])
    x = to_input(images, images.shape[1], resolution)
    train_idx, held_idx = split_indices(labels, seed)
    if len(held_idx) < PR_NEIGHBOURS + 2:
        raise ValueError(f"dataset '{data.name}' is too small for the evaluator ({len(labels)} images)")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DatasetClassifier(x.shape[1], resolution, num_classes)
    epochs = max(5, min(40, math.ceil(TARGET_STEPS / max(1, math.ceil(len(train_idx) / _BATCH)))))
    optimizer = torch.optim.Adam(model.parameters(), lr=_LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    model.train()
    for _ in range(epochs):
        perm = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for start in range(0, len(perm), _BATCH):
            batch = perm[start : start + _BATCH]
            loss = F.cross_entropy(model(_augment(x[batch], generator, data.flip)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        held = x[held_idx]
        model.heldout_accuracy.copy_((model(held).argmax(dim=1) == labels[held_idx]).float().mean())
        model.reference_features = model.body(held)
    return model


# --- the evaluator -------------------------------------------------------------------------------


class DatasetEvaluator:
    """A trained classifier and its reference: ``metrics(samples, labels)`` -> ``fid_<name>``,
    precision, recall (k=3) and class accuracy."""

    def __init__(self, name: str, key: str, classifier: DatasetClassifier):
        self.name, self.key, self.classifier = name, key, classifier
        feats = classifier.reference_features.numpy()
        self._reference = (feature_statistics(feats), manifold_radii(feats, PR_NEIGHBOURS))

    @property
    def metric_name(self) -> str:
        return f"fid_{self.name}"

    @property
    def heldout_accuracy(self) -> float:
        return float(self.classifier.heldout_accuracy)

    @torch.no_grad()
    def embed(self, images: ImagesLike, batch_size: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
        """Images (uint8 NHWC or float NCHW in [-1, 1]) -> (features [N, 128], logits [N, K])."""
        c = self.classifier
        x = to_input(images, c.channels, c.resolution)
        features, logits = [], []
        for start in range(0, x.shape[0], batch_size):
            hidden = c.body(x[start : start + batch_size])
            features.append(hidden)
            logits.append(c.head(hidden))
        if not features:
            return np.zeros((0, FEATURE_DIM), np.float32), np.zeros((0, c.num_classes), np.float32)
        return torch.cat(features).numpy(), torch.cat(logits).numpy()

    def metrics(self, images: ImagesLike, labels: LabelsLike = None,
                reference: Optional[ImagesLike] = None) -> Dict[str, Any]:
        """``reference``: real images to compare with instead of the held-out split."""
        features, logits = self.embed(images)
        if reference is None:
            (ref_stats, ref_radii), ref_features = self._reference, self.classifier.reference_features.numpy()
        else:
            ref_features, _ = self.embed(reference)
            ref_stats, ref_radii = feature_statistics(ref_features), None
        return feature_metrics(features, logits, labels, ref_features, ref_stats, ref_radii, self.metric_name)


def _to_bytes(evaluator: DatasetEvaluator, identity: Dict[str, Any]) -> bytes:
    c = evaluator.classifier
    info = {"version": EVALUATOR_VERSION, "name": evaluator.name, "key": evaluator.key, "identity": identity,
            "channels": c.channels, "resolution": c.resolution, "num_classes": c.num_classes,
            "heldout_accuracy": float(c.heldout_accuracy), "reference_images": int(c.reference_features.shape[0])}
    tensors = {k: v.detach().contiguous() for k, v in c.state_dict().items()}
    return save_safetensors_bytes(tensors, metadata={_METADATA_KEY: json.dumps(info, sort_keys=True, default=str)})


def _from_bytes(blob: bytes, key: str) -> Optional[DatasetClassifier]:
    """The classifier in ``blob``, or None when it is of another version or dataset, or unreadable."""
    try:
        header_len = int.from_bytes(blob[:8], "little")
        metadata = json.loads(blob[8 : 8 + header_len]).get("__metadata__") or {}
        info = json.loads(metadata.get(_METADATA_KEY, "{}"))
        if info.get("version") != EVALUATOR_VERSION or info.get("key") != key:
            return None
        tensors = load_safetensors_bytes(blob)
        model = DatasetClassifier(info["channels"], info["resolution"], info["num_classes"])
        model.reference_features = torch.zeros_like(tensors["reference_features"])
        model.load_state_dict(tensors, strict=True)
    except Exception:  # a damaged or foreign cache file is retrained, never trusted
        return None
    return model.eval().requires_grad_(False)


def cache_file_uri(cache_uri: str, data: EvalData) -> str:
    return storage.join(cache_uri, f"eval-{data.name}-{data.key}.safetensors")


_CACHE: Dict[str, DatasetEvaluator] = {}
_CACHE_LOCK = threading.Lock()


def get_dataset_evaluator(data: EvalData, cache_uri: Optional[str] = None,
                          storage_cfg: Optional[StorageConfig] = None) -> DatasetEvaluator:
    """The evaluator of ``data``: from this process's cache, else ``<cache_uri>/eval-<name>-<key>
    .safetensors``, else trained now (and written there when ``cache_uri`` is given). Training is
    deterministic, so concurrent trainers write identical files."""
    key = data.key
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        uri = cache_file_uri(cache_uri, data) if cache_uri else None
        classifier = None
        if uri and storage.exists(uri, storage_cfg):
            classifier = _from_bytes(storage.read_bytes(uri, storage_cfg), key)
            if classifier is None:
                log.warning("evaluator cache '%s' is from another version or damaged; retraining", uri)
        trained = classifier is None
        if trained:
            classifier = train_dataset_classifier(data)
        evaluator = DatasetEvaluator(data.name, key, classifier)
        if trained:
            log.info("trained the %s evaluator (held-out accuracy %.3f on %d images)", data.name,
                     evaluator.heldout_accuracy, classifier.reference_features.shape[0])
            if uri:
                storage.write_bytes(uri, _to_bytes(evaluator, data.identity), storage_cfg)
        _CACHE[key] = evaluator
        return evaluator


def default_cache_uri(eval_cfg, output_uri: str) -> str:
    """Where evaluators are kept: ``eval.cache_uri``, else ``<run.output_uri>/cache``."""
    return getattr(eval_cfg, "cache_uri", None) or storage.join(output_uri, "cache")


def calibrate(data: EvalData, evaluator: DatasetEvaluator, num_samples: int = 250, seed: int = 1) -> Dict[str, Any]:
    """What the metric reads for real images and for noise at ``num_samples`` samples: real =
    images of the classifier's training split (never the reference), noise = uniform pixels."""
    images, labels = data.load()
    train_idx, held_idx = split_indices(labels.long())
    generator = torch.Generator().manual_seed(seed)
    pick = train_idx[torch.randperm(len(train_idx), generator=generator)[:num_samples]]
    real = evaluator.metrics(images[pick], labels[pick])
    noise = evaluator.metrics(torch.rand((len(pick), *images.shape[1:]), generator=generator) * 2 - 1, labels[pick])
    return {"metric": evaluator.metric_name, "key": evaluator.key, "images": int(len(labels)),
            "reference_images": int(len(held_idx)), "heldout_accuracy": evaluator.heldout_accuracy,
            "num_samples": int(len(pick)), "real": real, "noise": noise}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """python -m speed.evaluate.dataset_fid [key=value ...]: train (or load) the evaluator of a
    config's data and print its calibration (the FID of real images and of noise) as JSON."""
    import sys

    from speed.config import load_config

    args = list(sys.argv[1:] if argv is None else argv)
    cfg = storage.absolute_paths(load_config(None, args))
    data = eval_data_from_config(cfg.data, cfg.storage, cfg.model.num_classes)
    evaluator = get_dataset_evaluator(data, default_cache_uri(cfg.eval, cfg.run.output_uri), cfg.storage)
    print(json.dumps(calibrate(data, evaluator), default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
