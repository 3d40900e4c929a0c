"""The one seeding scheme: every random draw comes from a named stream keyed by a tuple.

``stream_seed(seed, "noise", step)`` is a 63-bit integer that is a pure function of the run seed,
the stream's name and its key (a step, an epoch, a sample index, ...), stable across processes and
platforms (a digest, not Python's salted ``hash``). Distinct names never collide, so adding a
stream cannot shift another one, and a resumed run draws exactly what an uninterrupted one would.

Streams in use (name: key):
  timesteps: step         the global batch's timesteps (CPU generator)
  noise: step             the global batch's noise and label-dropout mask (device generator)
  routing: step           the global batch's kept tokens under model.routing (CPU generator)
  latents: step, offset   a rank's posterior sample of pre-encoded latents
  epoch-order: epoch      the order of the data set's items in one epoch
  flip: epoch, item key   one horizontal-flip coin per item
  sample-noise: index     a sample's starting noise (sampling jobs)
  sample-label: index     a sample's class when labels are drawn at random
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

_SEED_MASK = (1 << 63) - 1


def stream_seed(seed: int, stream: str, *key: object) -> int:
    """A 63-bit seed for stream ``stream`` of run ``seed`` at ``key`` (ints and strings)."""
    text = "|".join([str(int(seed)), stream, *(str(part) for part in key)])
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def generator(seed: int, stream: str, *key: object, device="cpu"):
    """A torch.Generator on ``device`` seeded from ``stream_seed``."""
    import torch  # here, not at the top: Ray Data decode workers never need torch

    return torch.Generator(device=device).manual_seed(stream_seed(seed, stream, *key))


def epoch_permutation(num_items: int, seed: int, epoch: int) -> "torch.Tensor":  # noqa: F821
    """The order of items in one epoch: torch.randperm from stream ``epoch-order``."""
    import torch

    return torch.randperm(num_items, generator=generator(seed, "epoch-order", int(epoch)))


def hash_flip_mask(keys: Iterable[str], seed: int, epoch: int) -> np.ndarray:
    """Horizontal-flip decisions, one fair coin per item key (stream ``flip``).

    Deciding from the key rather than the item's position keeps the decision the same however
    Ray Data splits, reorders or retries the blocks that carry the item.
    """
    return np.asarray([stream_seed(seed, "flip", int(epoch), key) & 1 for key in keys], dtype=bool)
