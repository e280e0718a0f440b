"""Counter-based random numbers from explicit keys, the way ``jax.random`` works, in plain tensor ops.

Randomness inside the training step (negative sampling, dropout in a loss term's head) must not come
from torch's global generator: that state is hidden, differs between eager and compiled code, cannot
be vmapped per student, and is not a function of the step. Here a **key** is a 0-d int64 tensor
holding a 32-bit value; a key is derived from the run's seed once (:func:`key_from_seed`), folded
with the step count in each step (:func:`fold_in`), and turned into numbers by hashing counters
(:func:`uniform`, :func:`randint`). Everything is integer arithmetic on tensors, so the same key gives
the same numbers eagerly, under ``torch.compile``, under ``torch.func.vmap`` (a batch of keys gives a
batch of independent streams) and after a resume.

The mixing function is the 32-bit finaliser of MurmurHash3 (Appleby 2008, ``fmix32``), applied to
``key * golden ^ counter`` (the golden-ratio increment of splitmix, Steele et al. 2014). Values are
kept in ``[0, 2**32)`` inside int64, masking after every multiplication (int64 products wrap modulo
``2**64``, which leaves the low 32 bits correct). This is a statistical generator for training, not a
cryptographic one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _fmix32(h: Tensor) -> Tensor:
    """MurmurHash3's avalanche: every input bit flips each output bit with probability ~1/2."""
    h = h & _MASK
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK
    return h ^ (h >> 16)


def key_from_seed(seed: int, device: torch.device | str = "cpu") -> Tensor:
    """The root key of a run: a 0-d int64 tensor determined by ``seed`` (any Python int)."""
    return _fmix32(torch.tensor(seed & _MASK, dtype=torch.int64, device=device) ^ _GOLDEN)


def fold_in(key: Tensor, data: Tensor | int) -> Tensor:
    """A new key from ``key`` and ``data`` (e.g. the step count): ``fmix32(fmix32(key) * golden ^ data)``.

    ``data`` may be an int or an integer tensor broadcastable with ``key``.
    """
    data = torch.as_tensor(data, dtype=torch.int64, device=key.device) & _MASK
    return _fmix32(((_fmix32(key) * _GOLDEN) & _MASK) ^ data)


def _bits(key: Tensor, shape: Sequence[int]) -> Tensor:
    """``shape`` independent 32-bit values (int64) from ``key``: the hash of ``(key, counter)``."""
    n = 1
    for s in shape:
        n *= int(s)
    counter = torch.arange(n, dtype=torch.int64, device=key.device).reshape(tuple(shape))
    mixed = (_fmix32(key) * _GOLDEN) & _MASK
    return _fmix32(_fmix32(mixed ^ counter) + mixed)


def uniform(key: Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform numbers in ``[0, 1)`` of ``shape``: the top 24 bits of each hash times ``2**-24``."""
    return (_bits(key, shape) >> 8).to(dtype) * (1.0 / (1 << 24))


def randint(key: Tensor, shape: Sequence[int], high: int) -> Tensor:
    """Integers in ``[0, high)`` of ``shape`` (int64), by ``floor(uniform * high)``.

    The bias of this mapping is below ``high / 2**24`` per value: negligible for the memory sizes of
    loss terms (``high`` up to a few million).
    """
    if high < 1:
        raise ValueError(f"randint: high must be >= 1 (got {high})")
    return torch.clamp((uniform(key, shape, torch.float64) * high).to(torch.int64), max=high - 1)
