"""The FID Inception network, built only from a verified local copy of its weights.

The weights are torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (the TensorFlow
FID graph converted to PyTorch), read from ``eval.inception_weights``. Following torch.hub's
naming convention, the 8 hex digits in the file name are the start of its SHA-256, which is
checked before anything is unpickled; the file is then read with ``torch.load(weights_only=True)``.
torch-fidelity's own constructor would download the file, or unpickle a given path with
``weights_only=False``; so it is handed an in-memory copy that we serialised ourselves from the
verified tensors, never the user's file. Nothing is downloaded.

Features follow the TensorFlow graph: bilinear resize to 299 without antialiasing
(torch-fidelity's TF1-compatible interpolation), 2048-d pool3 features for FID and
precision/recall, and the unbiased 1008-way logits for the Inception Score.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from speed import storage
from speed.config.schema import StorageConfig

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_FEATURE_DIM = 2048
INCEPTION_NUM_LOGITS = 1008
_FEATURES = ["2048", "logits_unbiased"]


class InceptionWeightsError(ValueError):
    """Missing, wrong or unsafe Inception weights; the message names eval.inception_weights."""


def _fetch_hint(key: str) -> str:
    return (
        f"download {INCEPTION_WEIGHTS_FILE} once from {INCEPTION_WEIGHTS_URL} (on a machine with internet access), "
        f"copy it to your storage, and set {key} to its path or s3:// URI"
    )


def load_inception_state_dict(uri: Optional[str], storage_cfg: Optional[StorageConfig] = None, *,
                              expected_sha256: Optional[str] = INCEPTION_SHA256_PREFIX,
                              key: str = "eval.inception_weights") -> Tuple[Dict[str, torch.Tensor], str]:
    """(state dict, sha256 hex) of the Inception weights at ``uri``, verified and safely unpickled.

    ``expected_sha256`` is a full digest or a prefix; None skips the check (tests with random
    weights only; jobs always check).
    """
    if not uri:
        raise InceptionWeightsError(f"{key} is not set; FID/IS with eval.feature_extractor=inception need it: {_fetch_hint(key)}")
    if not storage.exists(uri, storage_cfg):
        raise InceptionWeightsError(f"{key}: '{uri}' does not exist; {_fetch_hint(key)}")
    blob = storage.read_bytes(uri, storage_cfg)
    digest = hashlib.sha256(blob).hexdigest()
    if expected_sha256 is not None and not digest.startswith(expected_sha256.lower()):
        raise InceptionWeightsError(
            f"{key}: '{uri}' is not {INCEPTION_WEIGHTS_FILE}: its SHA-256 is {digest[:16]}..., expected one starting "
            f"with {expected_sha256}; {_fetch_hint(key)}"
        )
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        from speed.models.convert import unsafe_pickle_reason

        raise InceptionWeightsError(
            f"{key}: refusing to load '{uri}': unpickling it could run code ({unsafe_pickle_reason(exc)}); "
            f"{_fetch_hint(key)}"
        ) from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise InceptionWeightsError(f"{key}: '{uri}' is not a readable PyTorch weights file ({exc}); {_fetch_hint(key)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionWeightsError(f"{key}: '{uri}' does not hold a state dict of tensors; {_fetch_hint(key)}")
    return state, digest


class InceptionFeatures(torch.nn.Module):
    """uint8 images -> (pool3 features [N, 2048], unbiased logits [N, 1008]), both float32."""

    name = "inception"

    def __init__(self, state_dict: Dict[str, torch.Tensor]):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        buffer = io.BytesIO()
        torch.save(state_dict, buffer)  # bytes we produced from plain tensors: safe to unpickle
        buffer.seek(0)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", list(_FEATURES), feature_extractor_weights_path=buffer)
        except RuntimeError as exc:  # load_state_dict: wrong keys or shapes
            raise InceptionWeightsError(
                f"eval.inception_weights: the file does not hold the FID Inception network ({str(exc).splitlines()[0]}); "
                f"{_fetch_hint('eval.inception_weights')}"
            ) from None
        self.net.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """images: uint8 [N, 3, H, W] (any H, W; resized to 299 inside)."""
        pool, logits = self.net(images)
        return pool, logits

    def embed(self, images_nhwc: np.ndarray, device: Optional[torch.device] = None) -> Tuple[np.ndarray, np.ndarray]:
        """uint8 [N, H, W, C] (C 1 or 3) -> (features float32 [N, 2048], logits float32 [N, 1008])."""
        images = torch.from_numpy(np.ascontiguousarray(images_nhwc))
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"Inception features need uint8 images [N, H, W, 1 or 3], got {images.dtype} {tuple(images.shape)}")
        images = images.permute(0, 3, 1, 2)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)  # grey -> RGB, as the TF graph expects 3 channels
        device = device or next(self.net.parameters()).device
        pool, logits = self(images.to(device))
        return pool.float().cpu().numpy(), logits.float().cpu().numpy()


def load_inception(uri: Optional[str], storage_cfg: Optional[StorageConfig] = None, *,
                   expected_sha256: Optional[str] = INCEPTION_SHA256_PREFIX, device=None,
                   key: str = "eval.inception_weights") -> InceptionFeatures:
    """The verified Inception feature network from ``uri``, in eval mode on ``device``."""
    state, _ = load_inception_state_dict(uri, storage_cfg, expected_sha256=expected_sha256, key=key)
    network = InceptionFeatures(state)
    return network.to(device) if device is not None else network
