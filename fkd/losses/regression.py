"""SRRL: softmax regression representation learning (Yang et al., ICLR 2021, "Knowledge Distillation via
Softmax Regression Representation Learning").

The student's feature goes through a learnable connector (the ``srrl`` term's part) to the teacher's width;
the teacher's own classifier then reads it (``z_{s->T}``), and both the feature and those logits are
regressed onto the teacher's. Source followed: the authors' code, as in their later repository
jingyang2017/SRD_ossl (``distiller_zoo/AIN.py``: ``transfer_conv``, the connector, and ``statm_loss``, the MSE
of spatial means; ``helper/loops.py``, branch ``srd``: ``statm_loss(f_s, f_t) + mse(z_{s->T}, z_t)`` with the
student's and teacher's last maps; CIFAR-100 runs ``-a 0 -b 1``: CE 1, no KL, the sum weighted 1), which
torchdistill's ``SRDLoss`` also follows. Only for a ShuffleNetV1 student does their loop weigh the feature
part 10 (here: term weight 10, ``logit_weight`` 0.1).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["srrl"]


def _pooled(f: Tensor) -> Tensor:
    return f.mean(dim=(2, 3)) if f.ndim == 4 else f


def srrl(student_feat: Tensor, teacher_feat: Tensor, student_logits_via_teacher_head: Tensor,
         teacher_logits: Tensor, logit_weight: float = 1.0) -> Tensor:
    r"""``mse(mean_hw f_s, mean_hw f_t) + w * mse(z_{s->T}, z_t)``, each MSE a mean over all elements.

    Args:
        student_feat: the connector's output, ``(B, C, H, W)`` (spatially averaged first) or ``(B, C)``;
            ``C`` is the teacher's feature width.
        teacher_feat: the teacher's feature (its classifier's input), the same kind; detached.
        student_logits_via_teacher_head: ``(B, K)``, the teacher's classifier applied to the pooled
            ``student_feat`` (gradients flow through the frozen head into the student).
        teacher_logits: ``(B, K)``; detached.
        logit_weight: ``w``, the authors' weight of the softmax-regression part (1).

    Returns:
        0-d tensor. The paper's alpha / beta weights of the two parts against CE are the term's weight and
        ``logit_weight``.
    """
    f_s, f_t = _pooled(student_feat), _pooled(teacher_feat.detach())
    if f_s.shape != f_t.shape:
        raise ValueError(f"srrl: student feature {tuple(student_feat.shape)} and teacher feature "
                         f"{tuple(teacher_feat.shape)} pool to different shapes; connect the student to the "
                         "teacher's width first")
    z_s, z_t = student_logits_via_teacher_head, teacher_logits.detach()
    if z_s.shape != z_t.shape:
        raise ValueError(f"srrl: logits {tuple(z_s.shape)} and teacher logits {tuple(z_t.shape)} differ in shape")
    return F.mse_loss(f_s, f_t) + logit_weight * F.mse_loss(z_s, z_t)
