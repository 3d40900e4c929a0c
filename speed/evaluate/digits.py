"""The digits evaluator: a small CNN trained on the embedded digits stands in for Inception.

Inception features mean nothing on 8x8 grey digits, so the CPU configs judge samples with a
classifier trained on the real digits: its 128-d penultimate features give a digits-FID and
precision/recall against the real digits, and its predictions say how often a conditional sample
is recognised as its class. Training is seeded (same weights every time on the same platform),
takes a few seconds, and happens once: the result is cached in-process and, given a cache URI,
as a safetensors file that also carries the features of all real digits (the reference).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from speed import storage
from speed.config.schema import StorageConfig
from speed.evaluate.precision_recall import manifold_radii, precision_recall
from speed.evaluate.stats import FeatureStatistics, class_accuracy, feature_statistics, frechet_distance

log = logging.getLogger(__name__)

# Bump when the architecture, data split or training recipe changes: cached files are retrained.
CLASSIFIER_VERSION = 1
CLASSIFIER_SEED = 0
HELDOUT_FRACTION = 0.2
FEATURE_DIM = 128
NUM_CLASSES = 10
NATIVE_RESOLUTION = 8
PR_NEIGHBOURS = 3
_EPOCHS = 15
_BATCH = 64
_LR = 2e-3
_METADATA_KEY = "speed_digits_classifier"

ImagesLike = Union[np.ndarray, torch.Tensor]


class DigitsClassifier(nn.Module):
    """8x8 grey digit -> 10 classes. Buffers hold the held-out accuracy and the real digits' features."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # [N, 32, 4, 4]
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.register_buffer("heldout_accuracy", torch.zeros(()))
        self.register_buffer("reference_features", torch.zeros(0, FEATURE_DIM))
        self._reference_cache: Optional[Tuple[FeatureStatistics, torch.Tensor]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def embed(self, images: ImagesLike, batch_size: int = 2048) -> Tuple[np.ndarray, np.ndarray]:
        """Images (uint8 or float, see ``to_classifier_input``) -> (features [N, 128], logits [N, 10])."""
        x = to_classifier_input(images)
        was_training = self.training
        self.eval()
        features, logits = [], []
        for start in range(0, x.shape[0], batch_size):
            hidden = self.body(x[start : start + batch_size])
            features.append(hidden)
            logits.append(self.head(hidden))
        self.train(was_training)
        if not features:
            return np.zeros((0, FEATURE_DIM), np.float32), np.zeros((0, NUM_CLASSES), np.float32)
        return torch.cat(features).numpy(), torch.cat(logits).numpy()

    def reference(self) -> Tuple[FeatureStatistics, torch.Tensor]:
        """(statistics, k-NN radii) of the real digits' features, computed once per instance."""
        if self._reference_cache is None:
            feats = self.reference_features.numpy()
            self._reference_cache = (feature_statistics(feats), manifold_radii(feats, PR_NEIGHBOURS))
        return self._reference_cache


def to_classifier_input(images: ImagesLike) -> torch.Tensor:
    """Any digits-like images -> float32 [N, 1, 8, 8] in [-1, 1].

    uint8 images are taken as 0..255 and float images as [-1, 1]; layout NHWC or NCHW is told
    apart by which axis holds 1 or 3 channels (uint8 defaults to NHWC, float to NCHW). RGB becomes
    grey by averaging; other resolutions are resized to 8x8 (area averaging when shrinking).
    """
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    x = x.detach().cpu()
    is_uint8 = x.dtype == torch.uint8
    if x.ndim == 3:  # [N, H, W] grey
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"digits images must be [N, H, W, C] or [N, C, H, W], got shape {tuple(x.shape)}")
    channels_last = x.shape[-1] in (1, 3)
    channels_first = x.shape[1] in (1, 3)
    if channels_last and (not channels_first or is_uint8):
        x = x.permute(0, 3, 1, 2)
    x = x.float()
    if is_uint8:
        x = x / 127.5 - 1.0
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (NATIVE_RESOLUTION, NATIVE_RESOLUTION):
        mode = "area" if x.shape[-1] > NATIVE_RESOLUTION else "bilinear"
        x = F.interpolate(x, size=(NATIVE_RESOLUTION, NATIVE_RESOLUTION), mode=mode,
                          **({} if mode == "area" else {"align_corners": False}))
    return x.clamp(-1.0, 1.0).contiguous()


def _shift(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translations by up to one pixel (zero = background -1 padding): robustness to the small
    misalignments generated digits have."""
    padded = F.pad(batch, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + NATIVE_RESOLUTION, dx : dx + NATIVE_RESOLUTION]


def train_digits_classifier(seed: int = CLASSIFIER_SEED) -> DigitsClassifier:
    """Train on 80% of the digits (seeded split), measure accuracy on the other 20%."""
    from speed.data.digits import load_digits

    images, labels = load_digits(NATIVE_RESOLUTION, 1)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    held = int(round(len(labels) * HELDOUT_FRACTION))
    test_idx, train_idx = order[:held], order[held:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # parameter initialisation, without disturbing the caller's RNG
        model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=_LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=_EPOCHS)
    model.train()
    for _ in range(_EPOCHS):
        perm = train_idx[torch.randperm(len(train_idx), generator=generator)]
        for start in range(0, len(perm), _BATCH):
            batch = perm[start : start + _BATCH]
            loss = F.cross_entropy(model(_shift(images[batch], generator)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (model(images[test_idx]).argmax(dim=1) == labels[test_idx]).float().mean()
        model.heldout_accuracy.copy_(accuracy)
        model.reference_features = model.body(images)
    return model


def _to_bytes(model: DigitsClassifier) -> bytes:
    metadata = {_METADATA_KEY: json.dumps({"version": CLASSIFIER_VERSION, "seed": CLASSIFIER_SEED,
                                           "heldout_accuracy": float(model.heldout_accuracy)})}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return save_safetensors_bytes(tensors, metadata=metadata)


def _from_bytes(blob: bytes) -> Optional[DigitsClassifier]:
    """The classifier in ``blob``, or None when it is from another version or unreadable."""
    try:
        header_len = int.from_bytes(blob[:8], "little")
        metadata = json.loads(blob[8 : 8 + header_len]).get("__metadata__") or {}
        info = json.loads(metadata.get(_METADATA_KEY, "{}"))
        if info.get("version") != CLASSIFIER_VERSION:
            return None
        tensors = load_safetensors_bytes(blob)
        model = DigitsClassifier()
        model.reference_features = torch.zeros_like(tensors["reference_features"])
        model.load_state_dict(tensors, strict=True)
    except Exception:  # a damaged or foreign cache file is retrained, never trusted
        return None
    return model.eval().requires_grad_(False)


def default_classifier_uri(eval_cfg, output_uri: str) -> str:
    """Where the classifier is kept: ``eval.classifier_uri``, else a cache under ``run.output_uri``."""
    return eval_cfg.classifier_uri or storage.join(
        output_uri, "cache", f"digits-classifier-v{CLASSIFIER_VERSION}.safetensors"
    )


_CACHE: Dict[str, DigitsClassifier] = {}
_CACHE_LOCK = threading.Lock()


def get_digits_classifier(cache_uri: Optional[str] = None, storage_cfg: Optional[StorageConfig] = None) -> DigitsClassifier:
    """The trained digits classifier: from this process's cache, else ``cache_uri``, else trained
    now (and written to ``cache_uri`` when given). Training is deterministic, so concurrent
    trainers write identical files."""
    key = str(cache_uri or "")
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        model = None
        if cache_uri and storage.exists(cache_uri, storage_cfg):
            model = _from_bytes(storage.read_bytes(cache_uri, storage_cfg))
            if model is None:
                log.warning("digits classifier cache '%s' is from another version or damaged; retraining", cache_uri)
        if model is None:
            model = _CACHE.get("") or train_digits_classifier()
            if cache_uri:
                storage.write_bytes(cache_uri, _to_bytes(model), storage_cfg)
        _CACHE[key] = model
        _CACHE.setdefault("", model)
        return model


def digits_metrics(images_uint8_or_float: ImagesLike, labels: Optional[Union[Sequence[int], np.ndarray, torch.Tensor]],
                   reference: Union[str, ImagesLike] = "digits", classifier: Optional[DigitsClassifier] = None,
                   ) -> Dict[str, Any]:
    """digits-FID, precision, recall (k=3) and class accuracy of samples.

    ``images_uint8_or_float``: uint8 [N, H, W, C] (0..255) or float [N, C, H, W] in [-1, 1].
    ``labels``: the class each sample was conditioned on (None skips class_accuracy).
    ``reference``: "digits" (the embedded real digits) or real images in the same formats.
    """
    classifier = classifier or get_digits_classifier()
    features, logits = classifier.embed(images_uint8_or_float)
    if isinstance(reference, str):
        if reference != "digits":
            raise ValueError(f"reference={reference!r} is not valid; give 'digits' or an array of real images")
        ref_stats, ref_radii = classifier.reference()
        ref_features = classifier.reference_features.numpy()
    else:
        ref_features, _ = classifier.embed(reference)
        ref_stats, ref_radii = feature_statistics(ref_features), None
    return feature_metrics(features, logits, labels, ref_features, ref_stats, ref_radii, "digits_fid")


def feature_metrics(features, logits, labels, ref_features, ref_stats, ref_radii, fid_name: str) -> Dict[str, float]:
    """FID (named ``fid_name``), precision/recall and class accuracy of generated features against a
    reference's features and statistics (shared by the digits and the per-dataset evaluators)."""
    stats = feature_statistics(features)
    precision, recall = precision_recall(ref_features, features, k=PR_NEIGHBOURS, real_radii=ref_radii)
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    return {
        fid_name: frechet_distance(stats.mu, stats.sigma, ref_stats.mu, ref_stats.sigma),
        "precision": precision,
        "recall": recall,
        "class_accuracy": class_accuracy(logits, None if labels is None else np.asarray(labels)),
    }
