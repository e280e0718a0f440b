"""Prime-aware adaptive distillation (PAD): an L2 hint weighted by a learned per-dimension variance.

Zhang et al., "Prime-Aware Adaptive Distillation", ECCV 2020; fkd follows torchdistill's ``PADL2Loss``
(``torchdistill/losses/mid_level.py``) and its variance branch ``VarianceBranch4PAD``
(``torchdistill/models/wrapper.py``: ``Linear(D, D) + BatchNorm1d(D)`` on the student's embedding).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pad_l2", "variance_branch"]


def pad_l2(student_feat: Tensor, teacher_feat: Tensor, log_variance: Tensor, eps: float = 1e-6) -> Tensor:
    r"""``mean_B mean_D[(t - s)^2 / (eps + e^{lv}) + lv]`` over features flattened to ``(B, D)``.

    A large learned variance ``e^{lv}`` down-weights a hard dimension of an example, the ``+ lv`` keeps it
    from growing without bound (the Gaussian NLL up to a factor 1/2 and a constant; the paper's Eq. 5).
    torchdistill's comment: "The author's provided code takes average of losses" -- the mean over D, not
    the sum the paper writes.

    Args:
        student_feat: ``(B, ...)`` (after the term's connector), flattened to ``(B, D)``.
        teacher_feat: ``(B, ...)`` with the same ``D``.
        log_variance: ``(B, D)``, the features' own shape (flattened like them), or broadcastable to
            ``(B, D)``: the variance branch's output.
        eps: added to the variance.
    """
    s, t = student_feat.flatten(1), teacher_feat.detach().flatten(1)
    if s.shape != t.shape:
        raise ValueError(f"pad_l2: student feature of shape {tuple(student_feat.shape)} and teacher feature of shape "
                         f"{tuple(teacher_feat.shape)} flatten to different sizes; map the student's with a connector")
    lv = log_variance.flatten(1) if log_variance.ndim > 2 else log_variance  # (B, C, H, W) like the features
    return ((t - s).pow(2) / (eps + torch.exp(lv)) + lv).mean(dim=1).mean()


def variance_branch(embedding: Tensor, params: dict[str, Tensor], eps: float = 1e-5) -> Tensor:
    """torchdistill's ``VarianceBranch4PAD`` estimator in train mode: ``BatchNorm1d(Linear(e))`` with the
    batch's statistics (biased variance), ``(B, D_in) -> (B, D)``; ``params``: ``weight`` (D, D_in),
    ``bias`` (D,), ``gamma`` (D,), ``beta`` (D,)."""
    h = embedding.flatten(1) @ params["weight"].T + params["bias"]
    mean, var = h.mean(dim=0), h.var(dim=0, unbiased=False)
    return (h - mean) / torch.sqrt(var + eps) * params["gamma"] + params["beta"]
