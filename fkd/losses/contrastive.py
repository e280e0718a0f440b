r"""Contrastive representation distillation (CRD; Tian, Krishnan & Isola, ICLR 2020).

The student's and the teacher's embeddings go through small linear heads onto the unit sphere in
``feat_dim`` dimensions (``h(x) = l2norm(W x + b)``). Two memory banks hold, for every training example
``i``, a running average of its student embedding ``m_s[i]`` and of its teacher embedding ``m_t[i]``.
For a batch with example indices ``idx`` and ``K`` negative indices per example (``contrast_idx``, the
positive in column 0), each side is scored against the *other* side's memory::

    p_s[b, j] = exp(<m_t[c_bj], v_s[b]> / T) / Z_s       (student embedding vs teacher memory)
    p_t[b, j] = exp(<m_s[c_bj], v_t[b]> / T) / Z_t       (teacher embedding vs student memory)

and the noise-contrastive estimate of Tian et al. (eq. 10; their ``ContrastLoss``), with noise
probability ``P_n = 1 / N`` over the ``N`` examples::

    nce(p) = -(1/B) sum_b [ log(p_b0 / (p_b0 + K P_n + eps))
                            + sum_{j>=1} log(K P_n / (p_bj + K P_n + eps)) ]

    loss = nce(p_s) + nce(p_t)

As in the authors' code (RepDistiller ``crd/memory.py``): ``Z`` is fixed at the first step to
``mean(exp(scores / T)) * N`` and kept; the memories are updated after the step with momentum ``m``,
``m[i] <- l2norm(m * m[i] + (1 - m) * v[i])``, from detached embeddings; the memories start uniform in
``(-1/sqrt(D/3), 1/sqrt(D/3))``. Differences: negatives are drawn uniformly over all ``N`` examples (the
paper's default; RepDistiller's CIFAR loader draws them from other classes only), from the step's
explicit key; and a score is computed as one ``(B, D) @ (D, N)`` product then gathered, instead of
gathering ``(B, K+1, D)`` memory rows -- the same dot products with ``B N`` rather than ``B K D``
memory, which matters at ``K = 16384``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def init_memory(num_examples: int, dim: int, *, generator: torch.Generator | None = None) -> Tensor:
    """A memory bank ``(N, D)`` uniform in ``(-s, s)``, ``s = 1/sqrt(D/3)`` (RepDistiller's init)."""
    bound = 1.0 / math.sqrt(dim / 3)
    return torch.rand(num_examples, dim, generator=generator) * (2 * bound) - bound


def contrast_scores(embedding: Tensor, memory: Tensor, contrast_idx: Tensor, temperature: float) -> Tensor:
    """``exp(<memory[contrast_idx[b, j]], embedding[b]> / T)``, shape (B, K+1).

    Args:
        embedding: (B, D) unit vectors from one side's head.
        memory: (N, D) the other side's memory bank (no gradient flows into it).
        contrast_idx: (B, K+1) int64 row indices into ``memory``; column 0 is each example's own row.
    """
    similarity = embedding @ memory.detach().T  # (B, N)
    return torch.exp(torch.gather(similarity, 1, contrast_idx) / temperature)


def nce_loss(scores: Tensor, num_examples: int, eps: float = 1e-7) -> Tensor:
    """Tian et al.'s NCE loss of normalised scores (B, K+1) whose column 0 is the positive; see above."""
    k = scores.shape[1] - 1
    noise = k / num_examples  # K * P_n
    log_positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    log_negative = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(log_positive.sum() + log_negative.sum()) / scores.shape[0]


def normaliser(scores: Tensor, z: Tensor, num_examples: int) -> Tensor:
    """The constant ``Z``: ``mean(scores) * N`` the first time (``z < 0``), ``z`` afterwards; detached."""
    return torch.where(z < 0, scores.detach().mean() * num_examples, z)


def momentum_update(memory: Tensor, idx: Tensor, embedding: Tensor, momentum: float) -> Tensor:
    """A new memory with rows ``idx`` set to ``l2norm(momentum * memory[idx] + (1 - momentum) * embedding)``.

    ``idx`` (B,) must hold distinct rows (a batch's example indices do). Out of place: ``memory`` is not
    changed.
    """
    rows = F.normalize(memory[idx] * momentum + embedding.detach() * (1 - momentum), dim=1)
    return memory.index_put((idx,), rows)


def crd(
    student_emb: Tensor,
    teacher_emb: Tensor,
    memory_student: Tensor,
    memory_teacher: Tensor,
    contrast_idx: Tensor,
    z_student: Tensor,
    z_teacher: Tensor,
    temperature: float = 0.07,
) -> tuple[Tensor, Tensor, Tensor]:
    """CRD's loss and the normalisers to keep: ``(loss, z_student, z_teacher)``; see the module docstring.

    Args:
        student_emb, teacher_emb: (B, D) unit vectors from the student's and the teacher's heads.
        memory_student, memory_teacher: (N, D) memory banks.
        contrast_idx: (B, K+1) int64, column 0 the batch's own example indices.
        z_student, z_teacher: 0-d normalisers; negative before the first step.
    """
    n = memory_student.shape[0]
    p_s = contrast_scores(student_emb, memory_teacher, contrast_idx, temperature)
    p_t = contrast_scores(teacher_emb, memory_student, contrast_idx, temperature)
    z_s, z_t = normaliser(p_s, z_student, n), normaliser(p_t, z_teacher, n)
    return nce_loss(p_s / z_s, n) + nce_loss(p_t / z_t, n), z_s, z_t
