"""Improved precision and recall (Kynkaanniemi et al. 2019), as ADM's evaluator computes them.

Each set's manifold is the union of balls around its features whose radius is the distance to the
k-th nearest neighbour within the set (k=3). Precision: the fraction of generated samples inside
the real manifold. Recall: the fraction of real samples inside the generated manifold. Distances
are squared Euclidean (||a||^2 - 2ab + ||b||^2, clamped at 0) in float32, in blocks, like ADM's
TensorFlow code; a block of rows against all columns is the largest thing held in memory.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch

DeviceLike = Union[str, torch.device, None]


def _as_tensor(features, device: torch.device) -> torch.Tensor:
    tensor = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    return tensor.to(device=device, dtype=torch.float32)


def _squared_distances(a: torch.Tensor, b: torch.Tensor, b_norms: torch.Tensor) -> torch.Tensor:
    a_norms = (a * a).sum(dim=1, keepdim=True)  # [Ra, 1]
    return (a_norms - 2.0 * (a @ b.T) + b_norms[None, :]).clamp_min_(0.0)  # [Ra, Rb]


def manifold_radii(features, k: int = 3, batch_size: int = 4096, device: DeviceLike = None) -> torch.Tensor:
    """Squared distance from each feature to its k-th nearest other feature. [N] float32."""
    device = torch.device(device or "cpu")
    feats = _as_tensor(features, device)
    n = feats.shape[0]
    if n <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {n}")
    norms = (feats * feats).sum(dim=1)
    radii = torch.empty(n, dtype=torch.float32, device=device)
    for start in range(0, n, batch_size):
        block = _squared_distances(feats[start : start + batch_size], feats, norms)
        # The (k+1)-th smallest distance: the smallest is the point itself (0).
        radii[start : start + batch_size] = torch.kthvalue(block, k + 1, dim=1).values
    return radii


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 4096,
                     device: DeviceLike = None, real_radii: Optional[torch.Tensor] = None,
                     ) -> Tuple[float, float]:
    """(precision, recall) of ``fake_features`` [M, D] against ``real_features`` [N, D].

    ``real_radii`` (from ``manifold_radii``) may be passed when one real set is compared often.
    """
    device = torch.device(device or "cpu")
    real = _as_tensor(real_features, device)
    fake = _as_tensor(fake_features, device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision/recall needs features [N, D] and [M, D], got {tuple(real.shape)} and {tuple(fake.shape)}")
    real_radii = manifold_radii(real, k, batch_size, device) if real_radii is None else real_radii.to(device)
    fake_radii = manifold_radii(fake, k, batch_size, device)
    real_norms = (real * real).sum(dim=1)
    fake_in_real = torch.zeros(fake.shape[0], dtype=torch.bool, device=device)
    real_in_fake = torch.zeros(real.shape[0], dtype=torch.bool, device=device)
    for start in range(0, fake.shape[0], batch_size):
        block = _squared_distances(fake[start : start + batch_size], real, real_norms)  # [b, N]
        fake_in_real[start : start + batch_size] = (block <= real_radii[None, :]).any(dim=1)
        real_in_fake |= (block <= fake_radii[start : start + batch_size, None]).any(dim=0)
    return float(fake_in_real.float().mean()), float(real_in_fake.float().mean())
