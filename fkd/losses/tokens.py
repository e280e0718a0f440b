"""Token sequences, the third kind of feature: a transformer's ``(B, N, D)`` beside vectors ``(B, D)``
and maps ``(B, C, H, W)``.

Pure shape helpers the feature terms use to put a token sequence and another feature side by side:

* a map is a sequence of ``H*W`` tokens of width ``C``, in raster order (:func:`map_to_tokens`), the
  order a ViT's patch embedding gives its patches;
* timm's transformers put their *prefix* tokens (class, distillation, register tokens) in front of the
  patch tokens, so two sequences of different lengths are matched on their last ``min(N_s, N_t)`` tokens,
  the patches, when they differ by at most :data:`MAX_PREFIX_TOKENS` (:func:`token_pair`);
* relation terms (RKD, PKT, SP, CC, CRD) read one vector per example: the mean token
  (:func:`pool_tokens`).

Only shapes are branched on, never values, so these compose with ``grad``, ``vmap`` and ``compile``.
"""

from __future__ import annotations

import einops
from torch import Tensor

__all__ = ["MAX_PREFIX_TOKENS", "map_to_tokens", "pool_tokens", "token_count", "token_pair", "tokens_match"]

#: The most prefix tokens (class, distillation, registers) one sequence may have beyond the other's.
MAX_PREFIX_TOKENS = 8


def map_to_tokens(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)``: one token per position, in raster order."""
    return einops.rearrange(x, "b c h w -> b (h w) c")


def pool_tokens(x: Tensor) -> Tensor:
    """``(B, N, D)`` -> ``(B, D)``: the mean over the N tokens (prefix tokens included)."""
    return x.mean(dim=-2)


def token_count(shape: tuple) -> int:
    """Tokens in a feature of ``shape`` (batch excluded): N of ``(N, D)``, H*W of ``(C, H, W)``."""
    return shape[0] if len(shape) == 2 else shape[1] * shape[2]


def tokens_match(n_student: int, n_teacher: int) -> bool:
    """Whether sequences of these lengths can be matched: equal, or one longer by prefix tokens only."""
    return abs(n_student - n_teacher) <= MAX_PREFIX_TOKENS and min(n_student, n_teacher) > 0


def token_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """``(student (B, n, D_s), teacher (B, n, D_t))``: both as token sequences (a map via
    :func:`map_to_tokens`), cut to their last ``n = min(N_s, N_t)`` tokens (prefix tokens dropped).

    Args:
        student: ``(B, N_s, D_s)`` tokens or ``(B, C_s, H, W)`` map.
        teacher: ``(B, N_t, D_t)`` tokens or ``(B, C_t, H, W)`` map.

    Raises:
        ValueError: a side is neither tokens nor a map, or the lengths differ by more than
            :data:`MAX_PREFIX_TOKENS`.
    """
    s, t = (map_to_tokens(x) if x.ndim == 4 else x for x in (student, teacher))
    if s.ndim != 3 or t.ndim != 3:
        raise ValueError(f"token_pair: expected (B, N, D) tokens or (B, C, H, W) maps, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if not tokens_match(s.shape[1], t.shape[1]):
        raise ValueError(f"token_pair: {s.shape[1]} student tokens cannot be matched with {t.shape[1]} teacher tokens")
    n = min(s.shape[1], t.shape[1])
    return s[:, s.shape[1] - n:], t[:, t.shape[1] - n:]
