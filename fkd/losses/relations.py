"""Relational distillation on embeddings: the student mimics how the teacher relates the examples of a batch.

Each function takes a student and a teacher tensor of shape ``(B, ...)``, flattens both to ``(B, D)``
(student and teacher may have different ``D``: only ``B x B`` or ``B x B x B`` relation tensors are
compared), and returns a 0-d tensor; the teacher is detached. The batch is what these losses relate,
so the first axis must be it: to run several students at once, ``vmap`` over an axis in front.

Sources and the reference code followed
---------------------------------------
``similarity_preserving``   Tung & Mori, ICCV 2019            RepDistiller/mdistiller ``Similarity``
``rkd``                     Park et al., CVPR 2019            RepDistiller/mdistiller ``RKDLoss``
``pkt``                     Passalis & Tefas, ECCV 2018       RepDistiller ``PKT`` (from the authors)
``correlation_congruence``  Peng et al., ICCV 2019            torchdistill ``CCKDLoss`` (Gaussian RBF)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor

Scalar = float | Tensor

__all__ = ["correlation_congruence", "pkt", "rkd", "similarity_preserving"]


def _flat_pair(fn: str, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, D_s)`` and ``(B, D_t)`` views of the inputs, the teacher detached."""
    if student.ndim < 2 or teacher.ndim < 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{fn}: expected student and teacher tensors of shape (B, ...) with the same B, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    return student.flatten(1), teacher.detach().flatten(1)


def _gram(z: Tensor) -> Tensor:
    """``(B, B)`` inner products ``z_i . z_j``."""
    return einsum(z, z, "i d, j d -> i j")


def similarity_preserving(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    r"""Similarity-preserving KD: match the batch's row-normalised Gram matrices.

    .. math::

        G = z z^\top \in \mathbb R^{B \times B},\quad \tilde G_{i,:} = G_{i,:} / \lVert G_{i,:} \rVert_2,
        \qquad L = \frac{1}{B^2} \lVert \tilde G_t - \tilde G_s \rVert_F^2

    Source: Tung & Mori 2019, eqs. 1-4 (the paper sums the per-layer-pair losses; pass one pair
    here). Rows are L2-normalised as in the authors' verified code (``F.normalize(G)``); some
    re-implementations normalise by the L1 norm instead.

    Args:
        student_feat: ``(B, ...)``, flattened to ``(B, D_s)``.
        teacher_feat: ``(B, ...)``, flattened to ``(B, D_t)``; detached.

    Returns:
        0-d tensor.
    """
    z_s, z_t = _flat_pair("similarity_preserving", student_feat, teacher_feat)
    g_s = F.normalize(_gram(z_s), p=2.0, dim=1)
    g_t = F.normalize(_gram(z_t), p=2.0, dim=1)
    return (g_t - g_s).pow(2).sum() / z_s.shape[0] ** 2


def _pairwise_distances(z: Tensor, eps: float = 1e-12) -> Tensor:
    """``(B, B)`` Euclidean distances, ``sqrt(max(|z_i|^2 + |z_j|^2 - 2 z_i.z_j, eps))``, 0 on the diagonal.

    The diagonal is zeroed by a multiplication (the reference code assigns into it), so no index
    assignment breaks ``vmap``.
    """
    sq = z.pow(2).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2.0 * _gram(z)).clamp(min=eps).sqrt()
    off_diagonal = 1.0 - torch.eye(z.shape[0], dtype=z.dtype, device=z.device)
    return d * off_diagonal


def _normalised_distances(z: Tensor) -> Tensor:
    """Pairwise distances divided by their mean over the ``B (B - 1)`` off-diagonal pairs (RKD's ``mu``)."""
    d = _pairwise_distances(z)
    pairs = max(z.shape[0] * (z.shape[0] - 1), 1)
    return d / (d.sum() / pairs).clamp(min=1e-12)


def _angles(z: Tensor) -> Tensor:
    """``(B, B, B)``: ``cos`` of the angle at ``z_i`` between ``z_j`` and ``z_k``, from unit difference vectors."""
    diff = rearrange(z, "j d -> 1 j d") - rearrange(z, "i d -> i 1 d")  # diff[i, j] = z_j - z_i
    unit = F.normalize(diff, p=2.0, dim=2)
    return einsum(unit, unit, "i j d, i k d -> i j k")


def rkd(student_emb: Tensor, teacher_emb: Tensor, distance_weight: Scalar = 25.0,
        angle_weight: Scalar = 50.0) -> Tensor:
    r"""Relational KD: distance-wise plus angle-wise relations, Huber (smooth L1, ``delta = 1``) losses.

    .. math::

        \psi_D(i, j) = \frac{\lVert z_i - z_j \rVert_2}{\mu},\quad
        \mu = \frac{1}{B(B-1)} \sum_{i \ne j} \lVert z_i - z_j \rVert_2 \qquad
        \psi_A(i, j, k) = \Big\langle \frac{z_j - z_i}{\lVert z_j - z_i \rVert},
                                      \frac{z_k - z_i}{\lVert z_k - z_i \rVert} \Big\rangle

        L = w_D \cdot \frac{1}{B^2} \sum_{i,j} \ell_\delta(\psi_D^s - \psi_D^t)
          + w_A \cdot \frac{1}{B^3} \sum_{i,j,k} \ell_\delta(\psi_A^s - \psi_A^t)

    Source: Park et al. 2019, eqs. 3-7, with the authors' code's choices (RepDistiller ``RKDLoss``):
    the Huber means run over every entry, the zero diagonal included; distances are
    ``sqrt(max(d^2, 1e-12))``; ``mu`` is the mean of the positive entries, which are exactly the
    off-diagonal ones; a zero difference vector has angle 0. The teacher side carries no gradient.
    Memory: the angle term builds ``(B, B, D)`` difference vectors and ``(B, B, B)`` angles.

    Args:
        student_emb: ``(B, ...)``, flattened to ``(B, D_s)``; ``B >= 2``.
        teacher_emb: ``(B, ...)``, flattened to ``(B, D_t)``; detached.
        distance_weight, angle_weight: ``w_D``, ``w_A`` (paper: 25 and 50).

    Returns:
        0-d tensor.
    """
    z_s, z_t = _flat_pair("rkd", student_emb, teacher_emb)
    distance = F.smooth_l1_loss(_normalised_distances(z_s), _normalised_distances(z_t))
    angle = F.smooth_l1_loss(_angles(z_s), _angles(z_t))
    return distance_weight * distance + angle_weight * angle


def _cosine_kernel_probabilities(z: Tensor, eps: float) -> Tensor:
    """PKT's conditional probabilities: ``(cos + 1) / 2`` between rows, each row normalised to sum 1."""
    unit = z / (z.norm(dim=1, keepdim=True) + eps)
    kernel = (_gram(unit) + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt(student_emb: Tensor, teacher_emb: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Probabilistic knowledge transfer: match cosine-kernel conditional probabilities by KL.

    .. math::

        K_{ij} = \tfrac12\Big(1 + \frac{z_i \cdot z_j}
                 {(\lVert z_i \rVert + \epsilon)(\lVert z_j \rVert + \epsilon)}\Big),
        \quad P_{ij} = \frac{K_{ij}}{\sum_k K_{ik}} \qquad
        L = \frac{1}{B^2} \sum_{i,j} P^t_{ij} \log \frac{P^t_{ij} + \epsilon}{P^s_{ij} + \epsilon}

    Source: Passalis & Tefas 2018, eqs. 7-10 (the cosine kernel of Sec. 3.2). As in the authors'
    code (``cosine_similarity_loss``, copied into RepDistiller), the KL is a *mean* over all ``B^2``
    entries (the paper sums), and ``eps`` is added to the norms and inside the log. The reference
    also zeroes NaNs after normalising, which only a NaN input could produce; that step is left out.

    Args:
        student_emb: ``(B, ...)``, flattened to ``(B, D_s)``.
        teacher_emb: ``(B, ...)``, flattened to ``(B, D_t)``; detached.
        eps: the ``epsilon`` above.

    Returns:
        0-d tensor.
    """
    z_s, z_t = _flat_pair("pkt", student_emb, teacher_emb)
    p_s = _cosine_kernel_probabilities(z_s, eps)
    p_t = _cosine_kernel_probabilities(z_t, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def _rbf_correlation(z: Tensor, gamma: Scalar, order: int) -> Tensor:
    """``(B, B)``: ``sum_{p=0}^{order} exp(-2 gamma) (2 gamma)^p / p! (z_i . z_j)^p``."""
    sim = _gram(z)
    series = sum((2.0 * gamma) ** p / math.factorial(p) * sim.pow(p) for p in range(order + 1))
    scale = torch.exp(-2.0 * gamma) if isinstance(gamma, Tensor) else math.exp(-2.0 * gamma)
    return scale * series


def correlation_congruence(student_emb: Tensor, teacher_emb: Tensor, gamma: Scalar = 0.4,
                           order: int = 2) -> Tensor:
    r"""Correlation congruence: match Gaussian-RBF correlation matrices of the batch.

    .. math::

        C_{ij} = \sum_{p=0}^{P} e^{-2\gamma} \frac{(2\gamma)^p}{p!} (z_i \cdot z_j)^p, \qquad
        L = \frac{1}{B^2} \lVert C_s - C_t \rVert_F

    ``C`` is the order-``P`` Taylor expansion of ``exp(-gamma |z_i - z_j|^2)`` for unit vectors
    (``|z_i - z_j|^2 = 2 - 2 z_i . z_j``). Source: Peng et al. 2019, eqs. 6-9. The paper writes the
    loss with a squared norm; this follows torchdistill's ``CCKDLoss`` (``torch.dist(...) / B^2``,
    gamma 0.4, P 2 in its configs): the Frobenius distance, not squared, and the embeddings as given
    (not normalised; RepDistiller's ``Correlation`` is a different formula altogether). At
    ``C_s = C_t`` the gradient of the norm is taken as 0.

    Args:
        student_emb: ``(B, ...)``, flattened to ``(B, D_s)``.
        teacher_emb: ``(B, ...)``, flattened to ``(B, D_t)``; detached.
        gamma: RBF width ``gamma > 0``.
        order: Taylor order ``P >= 0`` (a Python int: it sets the number of terms).

    Returns:
        0-d tensor.
    """
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"correlation_congruence: order must be an int >= 0, got {order!r}")
    z_s, z_t = _flat_pair("correlation_congruence", student_emb, teacher_emb)
    c_s = _rbf_correlation(z_s, gamma, order)
    c_t = _rbf_correlation(z_t, gamma, order)
    return torch.linalg.vector_norm(c_s - c_t) / z_s.shape[0] ** 2
