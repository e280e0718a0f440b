"""The deterministic order of examples and the seeds of per-batch randomness.

Bit-exact resumption needs every random choice to be a pure function of integers the
checkpoint already holds. Here those integers are ``(seed, epoch)`` for the shuffle and
``(seed, epoch, batch)`` for a batch's augmentation, so iterating an epoch from batch ``k``
reproduces exactly what an uninterrupted run would have seen from batch ``k`` on.
"""

from __future__ import annotations

import hashlib
import math
import struct

import torch

# Distinct tags keep the shuffle and the augmentation streams independent even when their
# integer arguments coincide.
_PERMUTATION = 0
_AUGMENTATION = 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers.

    A cryptographic hash (BLAKE2b) rather than arithmetic mixing, so nearby tuples such as
    ``(seed, epoch)`` and ``(seed, epoch + 1)`` give unrelated generators, identically on every
    platform and Python version.
    """
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    """The order in which an epoch visits ``n`` examples: (n,) int64 on the CPU.

    ``arange(n)`` without shuffling; otherwise ``randperm(n)`` from a CPU generator seeded by
    ``(seed, epoch)`` alone, so the order does not depend on the device or on what ran before.
    """
    if not shuffle:
        return torch.arange(n, dtype=torch.int64)
    generator = torch.Generator().manual_seed(derive_seed(_PERMUTATION, seed, epoch))
    return torch.randperm(n, generator=generator)


def augmentation_seed(seed: int, epoch: int, batch: int) -> int:
    """The seed of batch ``batch``'s augmentation in epoch ``epoch`` (see :func:`derive_seed`)."""
    return derive_seed(_AUGMENTATION, seed, epoch, batch)


def batch_count(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches in one pass over ``n`` examples: ``floor(n / B)`` with ``drop_last``, else ``ceil(n / B)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def batch_bounds(n: int, batch_size: int, *, start: int = 0, drop_last: bool = False):
    """``(b, lo, hi)`` for batches ``b = start, start + 1, ...``: batch ``b`` is ``order[lo:hi]``."""
    if start < 0:
        raise ValueError(f"start must be >= 0 (got {start})")
    for b in range(start, batch_count(n, batch_size, drop_last)):
        lo = b * batch_size
        yield b, lo, min(lo + batch_size, n)
