"""Streamlined knowledge distillation (SKD): an instance term and a direction term on logits.

Jeong, Lee & Choi, "Streamlined Knowledge Distillation", CVPR 2026. Two references exist and differ:

* ``mode="paper"``: the paper's equations, as torchdistill implements them (``SKDInstanceLoss``,
  ``SKDDirectionLoss`` in ``torchdistill/losses/mid_level.py``);
* ``mode="code"``: the authors' repository (github.com/HyunJunSik/StreamLined, ``Distiller/SKD.py``),
  built on MLKD's code: the instance KL carries ``T^2`` and, like the direction term, is multiplied by a
  low-confidence share (:func:`fkd.losses.multilevel.median_share`), and the Gram matrices are divided
  by the number of classes.

Both read ``(B, K)`` logits of one batch and return a 0-d tensor; the teacher's logits are detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fkd.losses.logits import _kl_rows
from fkd.losses.multilevel import _check_logits, median_share

__all__ = ["skd_instance", "skd_direction"]

MODES = ("paper", "code")


def _check_mode(fn: str, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{fn}: mode must be 'paper' or 'code' (got {mode!r})")


def skd_instance(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0,
                 mode: str = "paper") -> Tensor:
    r"""SKD's instance term ``L_INS``.

    ``"paper"`` (torchdistill ``SKDInstanceLoss``): ``mean_b KL(softmax(z_t/T) || softmax(z_s/T))``, no
    ``T^2``. ``"code"`` (the authors' ``kd_loss(...) * mask).mean()``): ``r_b T^2 mean_b KL(...)`` with
    ``r_b`` the share of examples whose teacher confidence ``max softmax(z_t)`` is at or below the batch
    median -- the code multiplies the batch mean by the mask before averaging, so the mask is a scalar
    share. T is 4 in the authors' code (the paper gives no value).

    Args:
        student_logits, teacher_logits: ``(B, K)``.
        temperature: softmax temperature T.
        mode: ``"paper"`` or ``"code"``.
    """
    _check_mode("skd_instance", mode)
    _check_logits("skd_instance", ("student_logits", student_logits), ("teacher_logits", teacher_logits))
    t = teacher_logits.detach()
    kl = _kl_rows(torch.log_softmax(t / temperature, dim=-1),
                  torch.log_softmax(student_logits / temperature, dim=-1)).mean()
    if mode == "paper":
        return kl
    share = median_share(torch.softmax(t, dim=-1).max(dim=-1).values)
    return share * temperature**2 * kl


def skd_direction(student_logits: Tensor, teacher_logits: Tensor, tikhonov: float = 0.1,
                  mode: str = "paper") -> Tensor:
    r"""SKD's direction term ``L_DIR``: a Mahalanobis distance between the Gram matrices of L2-normalised logits.

    .. math::

        G = \hat z \hat z^\top\ (/K \text{ in the code}),\quad D = G_s - G_t,\quad
        \Sigma' = \mathrm{cov}(D) + \lambda I,\quad
        L_{DIR} = \frac{1}{B} \sum_i \sqrt{D_{i,:} \Sigma'^{-1} D_{i,:}^\top}

    ``cov`` is ``torch.cov(D.T)``: the rows of ``D`` are the observations, normalised by ``B - 1``.
    The quadratic form is computed through the Cholesky factor ``L`` of ``Sigma'`` as ``||L^{-1} D_i||^2``
    (the paper's "covariance-whitened L2"; the code's ``cholesky_inverse`` gives the same number).
    ``"code"`` also divides the Gram matrices by K and multiplies the loss by ``r_c``, the share of classes
    whose summed teacher probability ``sum_b softmax(z_t)`` is at or below the median over classes (the
    code's ``(SKD_loss(...) * class_conf_mask).mean()``). Gradients flow through ``Sigma'`` as in both
    references. The square root has no finite gradient where a row of ``D`` is 0 (the student equals the
    teacher), as in both references.

    Args:
        student_logits, teacher_logits: ``(B, K)``.
        tikhonov: ``lambda`` added to the covariance's diagonal (0.1 in the authors' code).
        mode: ``"paper"`` or ``"code"``.
    """
    _check_mode("skd_direction", mode)
    _check_logits("skd_direction", ("student_logits", student_logits), ("teacher_logits", teacher_logits))
    t = teacher_logits.detach()
    b, k = student_logits.shape
    s_hat, t_hat = F.normalize(student_logits, p=2, dim=-1), F.normalize(t, p=2, dim=-1)
    scale = 1.0 / k if mode == "code" else 1.0
    diff = (s_hat @ s_hat.T - t_hat @ t_hat.T) * scale  # (B, B)
    centred = diff - diff.mean(dim=0, keepdim=True)
    cov = centred.T @ centred / (b - 1) + tikhonov * torch.eye(b, dtype=diff.dtype, device=diff.device)
    chol = torch.linalg.cholesky(cov)
    whitened = torch.linalg.solve_triangular(chol, diff.T, upper=False)  # column i: L^{-1} D_i
    loss = whitened.pow(2).sum(dim=0).sqrt().mean()
    if mode == "paper":
        return loss
    return median_share(torch.softmax(t, dim=-1).sum(dim=0)) * loss
