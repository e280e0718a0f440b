"""ReviewKD's hierarchical context loss (Chen et al., CVPR 2021, "Distilling Knowledge via Knowledge Review").

The ABF fusion modules that turn the student's features into the maps compared here are learnable parts of
the ``reviewkd`` term (:mod:`fkd.losses.connectors`), not of this loss.

Source followed: mdistiller's ``hcl_loss`` (``mdistiller/distillers/ReviewKD.py``), the authors' own code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["hcl"]


def _as_pairs(student_feats, teacher_feats) -> list[tuple[Tensor, Tensor]]:
    if isinstance(student_feats, Tensor) and isinstance(teacher_feats, Tensor):
        return [(student_feats, teacher_feats)]
    if isinstance(student_feats, Tensor) or isinstance(teacher_feats, Tensor):
        raise ValueError("hcl: give two tensors or two lists of tensors, not one of each")
    if len(student_feats) != len(teacher_feats) or not len(student_feats):
        raise ValueError(f"hcl: got {len(student_feats)} student and {len(teacher_feats)} teacher maps; "
                         "give the same number (at least one)")
    return list(zip(student_feats, teacher_feats))


def hcl(student_feats: Tensor | Sequence[Tensor], teacher_feats: Tensor | Sequence[Tensor],
        levels: Sequence[int] = (4, 2, 1)) -> Tensor:
    r"""Hierarchical context loss: MSE of each pair at full size and at coarser average-pooled sizes.

    Per pair of equal-shape ``(B, C, H, W)`` maps (mdistiller's ``hcl_loss``):

    .. math::

        L = \frac{\mathrm{mse}(f_s, f_t) + \sum_{l \in U} w_l\, \mathrm{mse}(P_l f_s, P_l f_t)}{1 + \sum_{l \in U} w_l}

    ``P_l`` is ``adaptive_avg_pool2d`` to ``l x l``, ``mse`` the mean over all elements, ``U`` the levels
    with ``l < H`` in the given order, and the weights ``w = 1/2, 1/4, 1/8, ...`` go to the *used* levels
    in turn (a 4 x 4 map uses 2 and 1 with weights 1/2 and 1/4). Pairs are summed. A ``(B, C, 1, 1)``
    pair (the pooled vector, as ReviewKD compares it) is a plain MSE.

    Args:
        student_feats: a ``(B, C, H, W)`` map or a list of them (the ABF outputs); differentiable.
        teacher_feats: the teacher's maps, the same shapes; detached.
        levels: pooled sizes tried, in order (the authors' ``[4, 2, 1]``).

    Returns:
        0-d tensor: the sum over pairs.
    """
    total = None
    for f_s, f_t in _as_pairs(student_feats, teacher_feats):
        if f_s.shape != f_t.shape or f_s.ndim != 4:
            raise ValueError(f"hcl: student map {tuple(f_s.shape)} and teacher map {tuple(f_t.shape)} must be "
                             "equal-shape (B, C, H, W) maps")
        f_t = f_t.detach()
        loss = F.mse_loss(f_s, f_t)
        weight, total_weight = 1.0, 1.0
        for level in levels:
            if level >= f_s.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(f_s, (level, level)),
                                              F.adaptive_avg_pool2d(f_t, (level, level)))
            total_weight += weight
        loss = loss / total_weight
        total = loss if total is None else total + loss
    return total if total is not None else torch.zeros(())
