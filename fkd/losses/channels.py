"""Inter-channel correlation KD (ICKD-C) and its student-side embedding.

Liu et al., "Exploring Inter-Channel Correlation for Diversity-Preserved Knowledge Distillation", ICCV
2021; fkd follows the authors' CIFAR-100 code, github.com/ADLab-AutoDrive/ICKD,
``Cifar100/distiller_zoo/ICKD.py`` (``ICKDLoss.batch_loss`` and ``Embed``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fkd.losses.connectors import conv_bn

__all__ = ["ickd", "conv_bn_embed"]


def ickd(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    r"""``sum (G_s - G_t)^2 / (C B)`` with ``G = normalize_rows(f f^T)``, ``f`` a ``(C, HW)`` map per example.

    The Gram matrix is ``C x C`` per example and each of its rows is L2-normalised (the code's
    ``normalize(bmm(f, f^T), dim=2)``; the paper's Eq. 4 has no normalisation); the squared difference is
    summed over the batch and both channel axes and divided by ``C B`` (the code's ``/ (ch * bsz)``).
    Leading axes in front of ``(C, H, W)`` count as the batch.

    Args:
        student_feat: ``(B, C, H, W)`` after the term's embedding (C = the teacher's channels).
        teacher_feat: ``(B, C, H, W)``.
    """
    if student_feat.ndim < 3 or student_feat.shape != teacher_feat.shape:
        raise ValueError(f"ickd: student feature of shape {tuple(student_feat.shape)} and teacher feature of shape "
                         f"{tuple(teacher_feat.shape)} must both be (B, C, H, W) and equal; embed the student's first")
    c = student_feat.shape[-3]
    examples = student_feat[..., 0, 0, 0].numel()

    def gram(f: Tensor) -> Tensor:
        f = f.flatten(-2)
        return F.normalize(f @ f.transpose(-1, -2), dim=-1)

    return (gram(student_feat) - gram(teacher_feat.detach())).pow(2).sum() / (c * examples)


def conv_bn_embed(x: Tensor, params: dict[str, Tensor], eps: float = 1e-5) -> Tensor:
    """The authors' ``Embed``: a bias-free 1x1 convolution then BatchNorm2d with the batch's statistics
    (train mode, biased variance); ``(B, C_in, H, W) -> (B, C_out, H, W)``. ``params``: ``weight``
    (C_out, C_in), ``gamma``, ``beta`` (C_out,)."""
    weight = params["weight"][:, :, None, None]  # (C_out, C_in) as a 1x1 kernel: the AB/OFD connector's layout
    return conv_bn(x, {"weight": weight, "bn_weight": params["gamma"], "bn_bias": params["beta"]}, eps=eps)
