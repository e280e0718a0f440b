"""Losses over groups of models: teacher ensembles and student cohorts.

``ensemble_distribution``  the weighted mixture of several teachers' soft targets (multi-teacher KD)
``confidence_weights``     per-example teacher weights from each teacher's cross-entropy (CA-MKD)
``ensemble_logits``        logits whose softmax at ``T`` is an ensemble's distribution, for any logit term
``mutual_learning``        deep mutual learning's KL from every peer, per cohort member (DML)
``mutual_learning_member`` one member's part of it, given the (detached) cohort

Shapes: ``M`` teachers or ``K`` cohort members on the leading axis, then ``(B, C)`` as everywhere in
:mod:`fkd.losses`. Pure functions: no ``.item()``, no data-dependent shapes, inputs untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fkd.losses.logits import _kl_rows

Scalar = float | Tensor


def ensemble_distribution(teacher_logits: Tensor, temperature: Scalar = 1.0, weights: Tensor | None = None) -> Tensor:
    r"""The teachers' soft targets, mixed: :math:`p(b) = \sum_m w_m\, \mathrm{softmax}(z_m(b) / T)`.

    Args:
        teacher_logits: ``(M, B, C)``, one row of logits per teacher; detached (teachers are constants).
        temperature: ``T > 0``.
        weights: ``(M,)`` per teacher, or ``(M, B)`` per teacher and example (:func:`confidence_weights`);
            normalised to sum to 1 over the teachers; uniform (``1/M``) when None.

    Returns:
        ``(B, C)`` probabilities, each row summing to 1.

    Multi-teacher KD with an averaged teacher distribution: You et al., KDD 2017, "Learning from Multiple
    Teacher Networks", eq. 2 (uniform weights); a per-teacher weight generalises it.
    """
    if teacher_logits.ndim != 3:
        raise ValueError(f"ensemble_distribution expects teacher_logits of shape (M, B, C), got "
                         f"{tuple(teacher_logits.shape)}")
    probs = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    m = teacher_logits.shape[0]
    if weights is None:
        return probs.mean(dim=0)
    weights = weights.detach().to(probs.dtype)
    if weights.shape not in ((m,), (m, teacher_logits.shape[1])):
        raise ValueError(f"ensemble_distribution: weights must have shape ({m},) or ({m}, {teacher_logits.shape[1]}), "
                         f"got {tuple(weights.shape)}")
    weights = weights / weights.sum(dim=0, keepdim=True)
    weights = weights.reshape(*weights.shape, *([1] * (probs.ndim - weights.ndim)))
    return (weights * probs).sum(dim=0)


def confidence_weights(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    r"""CA-MKD's per-example teacher weights, from each teacher's cross-entropy on the label.

    With :math:`\ell_m(b)` teacher ``m``'s cross-entropy on label :math:`y_b`,

    .. math:: w_m(b) = \frac{1}{M - 1}\Big(1 - \frac{e^{\ell_m(b)}}{\sum_j e^{\ell_j(b)}}\Big),

    so a teacher that is more wrong on an example weighs less there; the weights sum to 1 over the
    teachers. Unlabeled examples (label -1, a transfer set) get uniform weights ``1/M``.

    Source: Zhang, Chen & Wang, ICASSP 2022, "Confidence-Aware Multi-Teacher Knowledge Distillation",
    eq. 3 and their code (``attention = (1 - softmax(stack(ce_per_teacher))) / (M - 1)``).

    Args:
        teacher_logits: ``(M, B, C)`` with ``M >= 2``; detached.
        labels: ``(B,)`` int64, -1 for unlabeled.

    Returns:
        ``(M, B)`` non-negative weights summing to 1 over ``M``.
    """
    m = teacher_logits.shape[0]
    if m < 2:
        raise ValueError(f"confidence_weights needs at least 2 teachers, got {m}")
    log_p = F.log_softmax(teacher_logits.detach(), dim=-1)  # (M, B, C)
    safe = labels.clamp_min(0)
    ce = -log_p.gather(-1, safe.expand(m, -1).unsqueeze(-1)).squeeze(-1)  # (M, B)
    weights = (1.0 - F.softmax(ce, dim=0)) / (m - 1)
    uniform = torch.full_like(weights, 1.0 / m)
    return torch.where(labels >= 0, weights, uniform)


def ensemble_logits(teacher_logits: Tensor, temperature: Scalar = 1.0, weights: Tensor | None = None) -> Tensor:
    r"""``(B, C)`` logits :math:`T \log p` with :math:`p` = :func:`ensemble_distribution`, so that
    :math:`\mathrm{softmax}(T \log p / T) = p`: any term that reads the teacher only through
    ``softmax(z_t / T)`` (KD, DKD, DIST) sees the ensemble at its own temperature. ``p`` is clamped at
    the smallest normal float so that a class every teacher rules out gives a large negative logit, not
    ``-inf``."""
    p = ensemble_distribution(teacher_logits, temperature, weights)
    return temperature * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


def mutual_learning_member(student_logits: Tensor, cohort_logits: Tensor, temperature: Scalar = 1.0) -> Tensor:
    r"""One cohort member's mutual-learning loss: :math:`\frac{T^2}{K-1}\sum_{j} \mathrm{KL}(p_j \| p)`
    over the whole cohort, batch mean, with ``p = softmax(student_logits / T)`` and the cohort detached.

    The sum may include the member itself: :math:`\mathrm{KL}(\mathrm{sg}(p) \| p)` is 0 and so is its
    gradient (:math:`p - \mathrm{sg}(p)`), so this equals the mean over the ``K - 1`` peers of
    :func:`mutual_learning` for this member -- and needs no index of the member, so it runs unchanged
    under ``vmap`` over the members.

    Args:
        student_logits: ``(B, C)``, gradients flow into these.
        cohort_logits: ``(K, B, C)`` with ``K >= 2``, every member's logits (this one's included); detached.
    """
    k = cohort_logits.shape[0]
    if k < 2:
        raise ValueError(f"mutual learning needs a cohort of at least 2 members, got {k}")
    log_q = F.log_softmax(student_logits / temperature, dim=-1)  # (B, C)
    log_p = F.log_softmax(cohort_logits.detach() / temperature, dim=-1)  # (K, B, C)
    kl = _kl_rows(log_p, log_q)  # (K, B)
    return temperature**2 * kl.sum(dim=0).mean() / (k - 1)


def mutual_learning(cohort_logits: Tensor, temperature: Scalar = 1.0) -> Tensor:
    r"""Deep mutual learning, every member's loss at once: ``(K,)``, member ``k``'s

    .. math:: L_k = \frac{T^2}{K - 1} \sum_{j \ne k} \frac{1}{B} \sum_b
              \mathrm{KL}\big(\mathrm{softmax}(z_j(b)/T) \,\|\, \mathrm{softmax}(z_k(b)/T)\big)

    with every :math:`z_j, j \ne k` detached: member ``k``'s gradient flows into its own logits only.
    Summing the ``K`` losses therefore trains every member as if each had its own optimiser step.

    Source: Zhang, Xiang, Hospedales & Lu, CVPR 2018, "Deep Mutual Learning", eq. 5 (``K`` members,
    the mean KL from the peers); ``T`` and the ``T^2`` factor as in Hinton et al. 2015 (``T = 1`` is the paper).

    Args:
        cohort_logits: ``(K, B, C)``, ``K >= 2``.
    """
    if cohort_logits.ndim != 3:
        raise ValueError(f"mutual_learning expects cohort_logits of shape (K, B, C), got {tuple(cohort_logits.shape)}")
    peers = cohort_logits.detach()
    return torch.stack([mutual_learning_member(cohort_logits[k], peers, temperature)
                        for k in range(cohort_logits.shape[0])])
