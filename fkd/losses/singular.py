"""KDSVD: self-supervised knowledge distillation with singular value decomposition (Lee et al., ECCV 2018,
"Self-supervised Knowledge Distillation Using Singular Value Decomposition").

Source followed: mdistiller's ``KDSVD`` (``mdistiller/distillers/KDSVD.py``), a port of the authors'
TensorFlow code (sseung0703/SSKD_SVD).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["kdsvd", "singular_vectors"]


def _finite(x: Tensor) -> Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def singular_vectors(feat: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(V, S)`` of one map: ``(B, C, H, W) -> V (B, W, n), S (B, n)``.

    The map is reshaped to ``(B, C*H, W)``; ``V`` holds the first ``n`` right singular vectors as columns,
    each L2-normalised, and ``S`` the first ``n`` singular values, normalised to unit norm (mdistiller's
    ``svd``, non-finite entries zeroed as its ``removenan``).
    """
    if feat.ndim != 4:
        raise ValueError(f"kdsvd: expected (B, C, H, W) maps, got {tuple(feat.shape)}")
    x = feat.reshape(feat.shape[0], feat.shape[1] * feat.shape[2], feat.shape[3])
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    v, s = _finite(vh.mT), _finite(s)
    return F.normalize(v[:, :, :n], dim=1), F.normalize(s[:, :n], dim=1)


def _aligned(v_s: Tensor, v_t: Tensor) -> Tensor:
    """The student's vectors matched to the teacher's: for each teacher vector, the student vector with the
    largest ``|cosine|``, sign-flipped to agree (mdistiller's ``align_rsv``). ``(B, W, n+3), (B, W, n) -> (B, W, n)``."""
    cosine = v_s.mT @ v_t  # (B, n+3, n)
    best = cosine.abs().amax(dim=1, keepdim=True)
    mask = torch.where(cosine.abs() == best, torch.sign(cosine), torch.zeros_like(cosine))
    return v_s @ mask


def kdsvd(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], k: int = 1) -> Tensor:
    r"""KDSVD: RBF relations between consecutive layers' leading singular vectors, student against teacher.

    For each layer ``l``, each map reshaped to ``(B, C H, W)``: the teacher keeps its first ``k`` right
    singular vectors ``V_t`` (normalised) and singular values ``S_t`` (normalised to unit norm); the student
    keeps ``k + 3`` and, for each teacher vector, the one with the largest ``|cos|``, sign-aligned. Both
    are scaled by the teacher's ``S_t``. For consecutive layers ``l-1, l``:

    .. math::

        R_{b,i,j,n} = \exp\big(-(V^l_{b,i,n} - V^{l-1}_{b,j,n})^2 / 8\big), \qquad
        L = \frac{1}{B} \sum_{l \ge 1} \sum_{b,i,j,n} (R^s - R^t)^2

    with non-finite summands taken as 0 (mdistiller's ``kdsvd_loss``). The student's and the teacher's
    maps must share ``W`` at each layer. Gradients flow through the student's SVD.

    The value depends on the signs the SVD backend picks for the teacher's singular vectors (the student's
    are aligned to them, but the RBF between two layers compares two independently signed teacher
    vectors), so LAPACK, cuSOLVER and another library may give different losses on the same input. fkd
    follows mdistiller's port, not the TensorFlow code's other details.

    Args:
        student_feats: two or more ``(B, C_l, H_l, W_l)`` maps, shallow to deep; differentiable.
        teacher_feats: the teacher's maps at the same layers; detached.
        k: singular vectors kept from the teacher (mdistiller's ``K = 1``).

    Returns:
        0-d tensor.
    """
    if len(student_feats) != len(teacher_feats) or len(student_feats) < 2:
        raise ValueError(f"kdsvd: needs two or more layer pairs (got {len(student_feats)} student and "
                         f"{len(teacher_feats)} teacher maps)")
    total, previous = None, None
    for f_s, f_t in zip(student_feats, teacher_feats):
        if f_s.ndim != 4 or f_t.ndim != 4 or f_s.shape[0] != f_t.shape[0] or f_s.shape[3] != f_t.shape[3]:
            raise ValueError(f"kdsvd: student map {tuple(f_s.shape)} and teacher map {tuple(f_t.shape)} must be "
                             "(B, C, H, W) maps with the same B and W")
        v_t, s_t = singular_vectors(f_t.detach(), k)
        v_s, _ = singular_vectors(f_s, k + 3)
        v_s = _aligned(v_s, v_t)
        v_t, v_s = v_t * s_t.unsqueeze(1), v_s * s_t.unsqueeze(1)
        if previous is not None:
            v_sb, v_tb = previous
            r_s = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
            r_t = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)
            term = _finite((r_s - r_t).pow(2)).sum()
            total = term if total is None else total + term
        previous = (v_s, v_t)
    return total / student_feats[0].shape[0]
