"""Logit-based distillation beyond Hinton's KD: DKD, DIST and logit-standardised KD.

All three read ``(B, K)`` logits (classes on the last axis) and return a 0-d tensor; the teacher's
logits are detached. Extra leading axes in front of ``(B, K)`` are averaged over like the batch, so
``vmap`` over a leading axis (an ensemble of students, a sweep) equals a loop.

Sources
-------
``dkd``                    Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022 (mdistiller)
``dist``                   Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022
                           (github.com/hunto/DIST_KD -> image_classification_sota ``dist_kd.py``)
``logit_standardized_kd``  Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024
                           (github.com/sunshangquan/logit-standardization-KD)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Scalar = float | Tensor  # a Python number or a 0-d tensor

__all__ = ["dkd", "dkd_per_example", "dist", "logit_standardized_kd"]

#: What the DKD authors subtract from the target logit (after dividing by T) to drop it from NCKD.
_DKD_TARGET_OFFSET = 1000.0


def _kl_rows(log_p_t: Tensor, log_p_s: Tensor) -> Tensor:
    """``sum_c p_t (log p_t - log p_s)`` over the last axis; a zero teacher probability adds 0."""
    p_t = log_p_t.exp()
    return torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0).sum(dim=-1)


def _binary_log_probs(log_p: Tensor, target: Tensor) -> Tensor:
    """``(..., 2)``: ``log b = (log p_target, log sum_{c != target} p_c)`` from ``log p`` of ``(..., K)``."""
    log_target = torch.where(target, log_p, 0.0).sum(dim=-1)
    log_rest = torch.where(target, -torch.inf, log_p).logsumexp(dim=-1)
    return torch.stack([log_target, log_rest], dim=-1)


def dkd_per_example(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    alpha: Scalar = 1.0,
    beta: Scalar = 8.0,
    temperature: Scalar = 4.0,
) -> Tensor:
    r"""Decoupled KD of each example, ``alpha * TCKD + beta * NCKD`` (both ``T^2``-scaled); 0 where unlabeled.

    .. math::

        b = (p_y,\ 1 - p_y),\quad p = \mathrm{softmax}(z / T) \qquad
        \mathrm{TCKD} = T^2\, \mathrm{KL}(b_t \,\|\, b_s)

        \hat p = \mathrm{softmax}(z / T - 1000 \cdot \mathbb 1[c = y]) \qquad
        \mathrm{NCKD} = T^2\, \mathrm{KL}(\hat p_t \,\|\, \hat p_s)

    Source: Zhao et al. 2022, eq. 7 (the paper's NCKD is a KL over the non-target classes renormalised
    among themselves). As the authors' code (mdistiller ``dkd_loss``) does, the target class is dropped
    from NCKD by subtracting 1000 from its scaled logit before the softmax, not by slicing it out;
    that keeps shapes static. TCKD is the KL of the binary (target, rest) distributions; here
    ``log(1 - p_y)`` is a ``logsumexp`` over the other classes rather than ``log`` of a summed
    probability, which is the same number without the underflow.

    Args:
        student_logits: ``(..., K)``; gradients flow into these.
        teacher_logits: ``(..., K)``; detached.
        labels: ``(...)`` int64; a label ``< 0`` marks an unlabeled example (its value is 0).
        alpha, beta: weights of TCKD and NCKD (paper: 1 and 8 on CIFAR-100), floats or 0-d tensors.
        temperature: ``T > 0``.

    Returns:
        ``(...)``: each example's loss, 0 where ``labels < 0``.
    """
    _check_logits("dkd", student_logits, teacher_logits)
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"dkd: labels have shape {tuple(labels.shape)} but the logits have shape "
                         f"{tuple(student_logits.shape)}; expected labels of shape {tuple(student_logits.shape[:-1])}")
    teacher_logits = teacher_logits.detach()
    classes = torch.arange(student_logits.shape[-1], device=labels.device)
    target = classes == labels.unsqueeze(-1)  # all False in an unlabeled row
    z_s, z_t = student_logits / temperature, teacher_logits / temperature

    tckd = _kl_rows(_binary_log_probs(F.log_softmax(z_t, dim=-1), target),
                    _binary_log_probs(F.log_softmax(z_s, dim=-1), target))
    offset = _DKD_TARGET_OFFSET * target.to(z_s.dtype)
    nckd = _kl_rows(F.log_softmax(z_t - offset, dim=-1), F.log_softmax(z_s - offset, dim=-1))
    per_example = temperature**2 * (alpha * tckd + beta * nckd)
    return torch.where(labels >= 0, per_example, 0.0)


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    alpha: Scalar = 1.0,
    beta: Scalar = 8.0,
    temperature: Scalar = 4.0,
) -> Tensor:
    r"""Decoupled KD (Zhao et al., CVPR 2022): the mean of :func:`dkd_per_example` over labeled examples.

    .. math::

        L = \frac{\sum_b m_b\, \ell_b}{\max(1, \sum_b m_b)}, \qquad m_b = \mathbb 1[y_b \ge 0]

    With every label valid this is the batch mean, the authors' ``dkd_loss``. Examples with a label
    ``< 0`` (an unlabeled transfer set) are left out by a masked sum, so shapes never depend on the
    data; with no labeled example the loss is 0.

    Args:
        student_logits: ``(B, K)`` (or ``(..., B, K)``: every leading axis is averaged over too).
        teacher_logits: ``(B, K)``; detached.
        labels: ``(B,)`` int64, ``-1`` for unlabeled.
        alpha, beta, temperature: see :func:`dkd_per_example`.

    Returns:
        0-d tensor.
    """
    per_example = dkd_per_example(student_logits, teacher_logits, labels, alpha, beta, temperature)
    labeled = (labels >= 0).to(per_example.dtype)
    return per_example.sum() / labeled.sum().clamp(min=1.0)


def _pearson(a: Tensor, b: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim``: cosine of the centred vectors, ``eps`` added
    to the product of norms (as the DIST code does)."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return (a * b).sum(dim=dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def dist(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: Scalar = 1.0,
    gamma: Scalar = 1.0,
    temperature: Scalar = 1.0,
) -> Tensor:
    r"""DIST: match the teacher's inter-class and intra-class relations by Pearson correlation.

    .. math::

        Y = \mathrm{softmax}(Z / T) \in \mathbb R^{B \times K}

        L = T^2 \Big(\beta \big(1 - \tfrac1B \textstyle\sum_b \rho(Y_{s,b,:}, Y_{t,b,:})\big)
              + \gamma \big(1 - \tfrac1K \textstyle\sum_k \rho(Y_{s,:,k}, Y_{t,:,k})\big)\Big)

    with ``rho`` the Pearson correlation (``eps = 1e-8`` added to the product of the norms, as in the
    authors' code). Source: Huang et al. 2022, eqs. 5-9. The ``T^2`` factor and the temperature come
    from the authors' classification code (``DIST(beta, gamma, tau)``); the paper writes the loss at
    ``T = 1``.

    Args:
        student_logits: ``(B, K)``, ``B >= 2`` (the intra-class term correlates over the batch);
            leading axes in front are averaged over.
        teacher_logits: ``(B, K)``; detached.
        beta: weight of the inter-class (per example, over classes) relation.
        gamma: weight of the intra-class (per class, over the batch) relation.
        temperature: ``T > 0``.

    Returns:
        0-d tensor in ``[0, 2 T^2 (beta + gamma)]``.
    """
    _check_logits("dist", student_logits, teacher_logits)
    if student_logits.ndim < 2:
        raise ValueError(f"dist: expected (B, K) logits, got shape {tuple(student_logits.shape)}")
    y_s = F.softmax(student_logits / temperature, dim=-1)
    y_t = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    inter = 1.0 - _pearson(y_s, y_t, dim=-1).mean()
    intra = 1.0 - _pearson(y_s, y_t, dim=-2).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def _standardize(logits: Tensor) -> Tensor:
    """Z-score over classes: ``(z - mean) / (1e-7 + std)``, ``std`` with Bessel's correction."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (1e-7 + std)


def logit_standardized_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: Scalar) -> Tensor:
    r"""KD on z-scored logits (Sun et al., CVPR 2024).

    .. math::

        \tilde z = \frac{z - \bar z}{10^{-7} + \sigma(z)}, \qquad
        L = T^2 \cdot \frac1B \sum_b \mathrm{KL}\big(\mathrm{softmax}(\tilde z_t / T)\,\|\,
            \mathrm{softmax}(\tilde z_s / T)\big)

    ``sigma`` is the standard deviation over classes with Bessel's correction (``torch.std``), and
    ``1e-7`` is added to it rather than under a square root, both as in the authors' ``normalize``.
    The paper (Sec. 4, Alg. 1) writes the temperature as a "base temperature" times the std; after the
    z-score that is this ``T``. The authors train with ``T = 2`` and weights CE 0.1, KD 9 on CIFAR-100.

    Args:
        student_logits: ``(B, K)``, ``K >= 2``; leading axes in front are averaged over.
        teacher_logits: ``(B, K)``; detached.
        temperature: ``T > 0``.

    Returns:
        0-d tensor, nats times ``T^2``.
    """
    _check_logits("logit_standardized_kd", student_logits, teacher_logits)
    log_p_s = F.log_softmax(_standardize(student_logits) / temperature, dim=-1)
    log_p_t = F.log_softmax(_standardize(teacher_logits.detach()) / temperature, dim=-1)
    return temperature**2 * _kl_rows(log_p_t, log_p_s).mean()


def _check_logits(fn: str, student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{fn}: student_logits have shape {tuple(student_logits.shape)} but teacher_logits "
                         f"have shape {tuple(teacher_logits.shape)}; they must match")
