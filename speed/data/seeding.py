"""Seeds derived from (seed, epoch, ...) tuples, so every random choice in the data plane is a pure
function of its inputs and a resumed run makes the same choices as an uninterrupted one."""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

_SEED_MASK = (1 << 63) - 1


def mix_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of ints and strings (stable across processes and platforms).

    Python's ``hash`` is salted per process for strings, so a cryptographic digest of the tuple's
    ``repr`` is used instead.
    """
    digest = hashlib.blake2b(repr(tuple(parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def epoch_permutation(num_items: int, seed: int, epoch: int) -> "torch.Tensor":
    """The order of items in one epoch: torch.randperm seeded from (seed, epoch)."""
    import torch  # here, not at the top: Ray Data decode workers never need torch

    generator = torch.Generator().manual_seed(mix_seed("epoch-order", int(seed), int(epoch)))
    return torch.randperm(num_items, generator=generator)


def hash_flip_mask(keys: Iterable[str], seed: int, epoch: int) -> np.ndarray:
    """Horizontal-flip decisions, one per item key: a fair coin per (seed, epoch, key).

    Deciding from the key rather than the item's position keeps the decision the same however
    Ray Data splits, reorders or retries the blocks that carry the item.
    """
    flips = [
        hashlib.blake2b(f"flip|{int(seed)}|{int(epoch)}|{key}".encode("utf-8"), digest_size=1).digest()[0] & 1
        for key in keys
    ]
    return np.asarray(flips, dtype=bool)
