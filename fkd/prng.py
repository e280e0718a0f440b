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

    ``data`` may be an int or an integer tensor broadcastable with ``key``. An int enters the arithmetic
    as a scalar operand, never as a new tensor, so folding it into a key on a GPU copies nothing from
    the host (no host-device transfer, no synchronisation).
    """
    if isinstance(data, int):
        data = data & _MASK
    else:
        data = torch.as_tensor(data, dtype=torch.int64, device=key.device) & _MASK
    return _fmix32(((_fmix32(key) * _GOLDEN) & _MASK) ^ data)


def key_from_int(value: int, device: torch.device | str = "cpu") -> Tensor:
    """A key for a non-negative integer of up to 64 bits (e.g. :func:`fkd.data.order.augmentation_seed`),
    made on ``device`` without a host-to-device copy: a zero key (a fill kernel) with the value's low and
    high 32-bit halves folded in (:func:`fold_in` with ints, scalar operands only).

    Not equal to :func:`key_from_seed` of the same value: the two are separate families of keys.
    """
    if value < 0:
        raise ValueError(f"key_from_int: value must be >= 0 (got {value})")
    key = torch.zeros((), dtype=torch.int64, device=device)
    return fold_in(fold_in(key, value & _MASK), (value >> 32) & _MASK)


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


def normal(key: Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal numbers of ``shape`` by the Box-Muller transform (Box & Muller 1958) of two
    uniform streams folded from ``key``: ``sqrt(-2 log u1) cos(2 pi u2)``, with ``u1`` in ``(0, 1]``."""
    u1 = 1.0 - uniform(fold_in(key, 1), shape, torch.float64)
    u2 = uniform(fold_in(key, 2), shape, torch.float64)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)).to(dtype)


GAMMA_PROPOSALS = 16  # Marsaglia-Tsang accepts > 95% of proposals, so all 16 fail with p < 1e-20


def gamma(key: Tensor, concentration: float, shape: Sequence[int]) -> Tensor:
    """Gamma(concentration, 1) numbers of ``shape`` (float32) without data-dependent loops.

    Marsaglia & Tsang (2000), "A simple method for generating gamma variables": with ``d = a - 1/3``,
    ``c = 1 / sqrt(9 d)``, ``x ~ N(0, 1)``, ``v = (1 + c x)^3``, accept ``d v`` when ``v > 0`` and
    ``log u < x^2 / 2 + d - d v + d log v``. Rejection sampling loops until acceptance; here a fixed
    ``GAMMA_PROPOSALS`` proposals are drawn at once and the first accepted one is taken (the mean ``d``
    in the vanishing case that none is), so shapes never depend on the data (compilable, vmappable).
    For ``a < 1`` the paper's boost is used: ``Gamma(a) = Gamma(a + 1) * u^(1/a)``.
    """
    if not concentration > 0:
        raise ValueError(f"gamma: concentration must be > 0 (got {concentration})")
    a = concentration + 1.0 if concentration < 1 else concentration
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    shape = tuple(shape)
    x = normal(fold_in(key, 3), (GAMMA_PROPOSALS, *shape), torch.float64)
    u = 1.0 - uniform(fold_in(key, 4), (GAMMA_PROPOSALS, *shape), torch.float64)
    v = (1.0 + c * x) ** 3
    ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp(min=1e-300)))
    first = torch.argmax(ok.to(torch.int64), dim=0, keepdim=True)  # the first accepted proposal
    value = torch.gather(d * v, 0, first)[0]
    value = torch.where(ok.any(dim=0), value, torch.full_like(value, d))
    if concentration < 1:
        boost = 1.0 - uniform(fold_in(key, 5), shape, torch.float64)
        value = value * boost ** (1.0 / concentration)
    return value.to(torch.float32)


def beta(key: Tensor, alpha: float, shape: Sequence[int] = ()) -> Tensor:
    """Beta(alpha, alpha) numbers of ``shape`` (float32): ``g1 / (g1 + g2)`` with ``g1, g2 ~ Gamma(alpha)``."""
    g1 = gamma(fold_in(key, 6), alpha, shape)
    g2 = gamma(fold_in(key, 7), alpha, shape)
    return g1 / (g1 + g2).clamp(min=1e-30)
