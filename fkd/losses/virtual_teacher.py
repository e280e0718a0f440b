"""Teacher-free KD's manually designed regularisation (Tf-KD_reg): a virtual teacher from the label.

Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization", CVPR 2020; the
authors' code is github.com/yuanli2333/Teacher-free-Knowledge-Distillation, ``my_loss_function.py``
(``loss_kd_regularization``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["tf_kd_regularization"]


def tf_kd_regularization(student_logits: Tensor, labels: Tensor, temperature: float = 20.0,
                         correct_prob: float = 0.99) -> Tensor:
    r"""``KL(softmax(u / T) || softmax(z_s))`` averaged over all ``B K`` entries, no ``T^2``.

    ``u`` is the virtual teacher's probability vector: ``correct_prob`` at the label, ``(1 - correct_prob) /
    (K - 1)`` elsewhere; it is softened at temperature T *as if it were logits* (the code's
    ``softmax(teacher_soft / T)``); the student is at T = 1.

    Where fkd follows the authors' code over the paper: the paper writes the KL with the student at
    temperature T and a ``T^2``-free weight; the code keeps the student at T = 1 and reduces with
    ``nn.KLDivLoss()``'s default ``'mean'`` -- the sum divided by ``B K``, not by B. ``(1 - alpha) CE`` and
    ``alpha * multiplier`` (CIFAR-100 ResNet-18: T = 20, alpha = 0.1, multiplier = 100) are the objective's
    weights. An example labelled -1 (unlabeled) gets the uniform virtual teacher.

    Args:
        student_logits: ``(B, K)``.
        labels: ``(B,)`` int64.
        temperature: T of the virtual teacher.
        correct_prob: the virtual teacher's probability of the labelled class (0.99 in the code).
    """
    if student_logits.ndim != 2 or labels.shape != student_logits.shape[:1]:
        raise ValueError(f"tf_kd_regularization: student_logits has shape {tuple(student_logits.shape)} and labels "
                         f"{tuple(labels.shape)}; they must be (B, K) and (B,)")
    k = student_logits.shape[-1]
    hit = labels[:, None] == torch.arange(k, device=labels.device)
    other = (1.0 - correct_prob) / (k - 1)
    u = hit.to(student_logits.dtype) * (correct_prob - other) + other
    log_p_t = torch.log_softmax(u / temperature, dim=-1)
    log_p_s = torch.log_softmax(student_logits, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).mean()
