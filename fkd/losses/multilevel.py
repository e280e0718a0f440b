"""Multi-level logit distillation (MLKD) and the low-confidence shares it (and SKD's code) scales by.

Jin, Wang & Lin, "Multi-Level Logit Distillation", CVPR 2023; the authors' code is
github.com/Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/distillers/KD_ours.py``. fkd follows that
code, quirks included (see :func:`mlkd`).

Every function reads ``(B, K)`` logits of one batch (its relations couple the examples, so there is no
leading-axis averaging: ``vmap`` over a stack of students gives each its own batch) and returns a 0-d
tensor; the teacher's logits are detached.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fkd.losses.logits import _kl_rows

__all__ = ["mlkd", "median_share", "kd_batchmean", "class_correlation", "batch_correlation"]

#: The extra temperatures of the authors' code, after the configured T: (T, 3, 5, 2, 6).
MLKD_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)


def _check_logits(fn: str, *pairs: tuple[str, Tensor]) -> None:
    first_name, first = pairs[0]
    for name, z in pairs:
        if z.ndim != 2 or z.shape != first.shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(z.shape)}; every logit tensor must be (B, K) like "
                             f"{first_name} {tuple(first.shape)}")


def median_share(values: Tensor) -> Tensor:
    """``mean(values <= median)``: the share of entries at or below the 50th percentile of ``values`` (1-D).

    The percentile interpolates linearly between the two middle order statistics, as ``np.percentile(v,
    50)`` does (the authors compute their thresholds with it on the host); here it is a sort and two static
    indices, so it runs on the device under ``vmap`` and ``torch.compile``. Not differentiable (a count).
    """
    n = values.shape[-1]
    ordered = values.detach().sort(dim=-1).values
    pos = 0.5 * (n - 1)
    lo, hi = int(pos), min(int(pos) + 1, n - 1)
    threshold = ordered[..., lo] + (ordered[..., hi] - ordered[..., lo]) * (pos - lo)
    return (values.detach() <= threshold[..., None]).to(values.dtype).mean(dim=-1)


def kd_batchmean(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 mean_b KL(softmax(z_t/T) || softmax(z_s/T))``: mdistiller's ``kd_loss`` (Hinton et al. 2015)."""
    log_p_s = torch.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = torch.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    return temperature**2 * _kl_rows(log_p_t, log_p_s).mean()


def class_correlation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``sum((P_t^T P_t - P_s^T P_s)^2) / K`` with ``P = softmax(z / T)`` of ``(B, K)``: MLKD's class-level
    (K x K) consistency, the authors' ``cc_loss`` (no T^2)."""
    p_s = torch.softmax(student_logits / temperature, dim=-1)
    p_t = torch.softmax(teacher_logits.detach() / temperature, dim=-1)
    return (p_t.T @ p_t - p_s.T @ p_s).pow(2).sum() / student_logits.shape[-1]


def batch_correlation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``sum((P_t P_t^T - P_s P_s^T)^2) / B``: MLKD's batch-level (B x B) consistency, the authors'
    ``bc_loss`` (no T^2)."""
    p_s = torch.softmax(student_logits / temperature, dim=-1)
    p_t = torch.softmax(teacher_logits.detach() / temperature, dim=-1)
    return (p_t @ p_t.T - p_s @ p_s.T).pow(2).sum() / student_logits.shape[0]


def mlkd(student_logits_weak: Tensor, teacher_logits_weak: Tensor, student_logits_strong: Tensor,
         teacher_logits_strong: Tensor, temperature: float = 4.0) -> Tensor:
    r"""Multi-level logit distillation on a weak and a strong view of the same batch (Jin et al. 2023).

    With ``T_all = (T, 3, 5, 2, 6)``, ``kd`` = :func:`kd_batchmean`, ``cc`` = :func:`class_correlation`,
    ``bc`` = :func:`batch_correlation`, ``s``/``t`` the student's/teacher's logits and ``w``/``st`` the views:

    .. math::

        L = \sum_{\tau \in T_{all}} \big[ r_b\,kd(s_w, t_w, \tau) + r_c\,cc(s_w, t_w, \tau)
              + r_b\,bc(s_w, t_w, \tau) \big]
            + \sum_{\tau \in (T, 3, 5)} kd(s_{st}, t_{st}, \tau) + \sum_{\tau \in (2, 6)} kd(s_w, t_w, \tau)

    ``r_b`` = :func:`median_share` of the teacher's top-1 confidence ``max softmax(t_w)`` over the batch,
    ``r_c`` = the same of its class sums ``sum_b softmax(t_w)`` (both at T = 1, on the weak view).

    Where fkd follows the authors' code over the paper (``KD_ours.forward_train``): the paper weighs each
    example (class) by a confidence mask; the code multiplies the *batch-mean* losses by the mask and then
    averages, so the masks act as the scalar shares ``r_b``, ``r_c`` (about 1/2 by construction of a
    median). The strong view's KD sum takes its ``T = 2`` and ``T = 6`` terms from the weak view, and the
    strong view's class and batch terms are computed but not returned by the code -- so they are not part
    of this loss. The CE terms (on both views, weight ``CE_WEIGHT``) and ``KD_WEIGHT`` belong to the
    objective's weights, not here.

    Args:
        student_logits_weak, teacher_logits_weak: ``(B, K)`` on the weak (standard) view.
        student_logits_strong, teacher_logits_strong: ``(B, K)`` on the strong (RandAugment) view.
        temperature: the first temperature ``T`` (the authors' ``KD.TEMPERATURE``, 4).
    """
    _check_logits("mlkd", ("student_logits_weak", student_logits_weak), ("teacher_logits_weak", teacher_logits_weak),
                  ("student_logits_strong", student_logits_strong), ("teacher_logits_strong", teacher_logits_strong))
    s_w, t_w = student_logits_weak, teacher_logits_weak.detach()
    s_st, t_st = student_logits_strong, teacher_logits_strong.detach()
    p_t = torch.softmax(t_w, dim=-1)
    share_b = median_share(p_t.max(dim=-1).values)
    share_c = median_share(p_t.sum(dim=0))
    temps = (temperature, *MLKD_TEMPERATURES)
    weak = sum(share_b * kd_batchmean(s_w, t_w, tau) + share_c * class_correlation(s_w, t_w, tau)
               + share_b * batch_correlation(s_w, t_w, tau) for tau in temps)
    strong = sum(kd_batchmean(s_st, t_st, tau) for tau in temps[:3])
    strong = strong + sum(kd_batchmean(s_w, t_w, tau) for tau in temps[3:])
    return weak + strong
