"""Losses on pre-ReLU features that care where the activation boundary lies: activation-boundary
distillation (AB) and the overhaul of feature distillation (OFD, margin ReLU with a partial L2).

Both compare the student's pre-activation (after a connector, a term's learnable part) with the
teacher's, before their ReLUs. Maps are ``(B, C, H, W)``; the teacher is detached.

Sources and the reference code followed
---------------------------------------
``ab``                 Heo et al., AAAI 2019   authors' code (bhheo/AB_distillation, ``criterion_alternative_L2``)
``ofd_margin``, ``ofd`` Heo et al., ICCV 2019   authors' code (clovaai/overhaul-distillation,
                                               ``get_margin_from_BN``, ``distillation_loss``)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ab", "ofd", "ofd_margin"]


def _check_maps(name: str, s: Tensor, t: Tensor, *, same_size: bool) -> None:
    if s.ndim != 4 or t.ndim != 4 or s.shape[:2] != t.shape[:2] or (same_size and s.shape != t.shape):
        raise ValueError(f"{name}: student map {tuple(s.shape)} and teacher map {tuple(t.shape)} must be "
                         f"(B, C, H, W) maps with the same B and C{' and size' if same_size else ''} "
                         "(a connector maps the student's channels onto the teacher's)")


def ab(student_preact: Tensor, teacher_preact: Tensor, margin: float = 1.0) -> Tensor:
    r"""Activation-boundary loss: a hinge-like squared loss on neurons whose on/off state differs.

    .. math::

        L = \frac{1}{B}\sum_{b,c,h,w} \Big[(s+\mu)^2\, 1(s > -\mu,\ t \le 0) + (s-\mu)^2\, 1(s \le \mu,\ t > 0)\Big]

    with ``s`` the student's pre-activation (through its connector), ``t`` the teacher's, ``mu`` the
    margin (Heo et al. 2019, eq. 7, the alternative loss). The authors' code (``criterion_alternative_L2``)
    sums over all elements; it then divides by the batch size and by 1000 and weights the layers, which
    fkd leaves to the term's weight. The indicators are multiplications, not indexing.

    Args:
        student_preact: ``(B, C, H, W)``, differentiable.
        teacher_preact: ``(B, C, H, W)``; detached.
        margin: ``mu >= 0`` (the authors' 1.0).

    Returns:
        0-d tensor, the sum over ``C, H, W`` averaged over the batch.
    """
    _check_maps("ab", student_preact, teacher_preact, same_size=True)
    s, t = student_preact, teacher_preact.detach()
    off = ((s > -margin) & (t <= 0)).to(s.dtype)
    on = ((s <= margin) & (t > 0)).to(s.dtype)
    loss = (s + margin).pow(2) * off + (s - margin).pow(2) * on
    return loss.sum() / s.shape[0]


def ofd_margin(bn_weight: Tensor, bn_bias: Tensor) -> Tensor:
    r"""OFD's per-channel margin from the teacher's BatchNorm before the ReLU: ``(C,), (C,) -> (C,)``.

    Taking the BN output of channel ``c`` as Gaussian with mean ``m = beta_c`` and std ``s = |gamma_c|``, the
    margin is the expectation of its negative part (Heo et al. 2019, eq. 4):

    .. math::

        \text{margin}_c = m - s\,\frac{\varphi(m/s)}{\Phi(-m/s)} \ \text{if}\ \Phi(-m/s) > 0.001, \
        \text{else}\ -3s

    (``phi``/``Phi``: the standard normal pdf / cdf), as the authors' ``get_margin_from_BN``. A constant:
    the result is detached.
    """
    if bn_weight.shape != bn_bias.shape or bn_weight.ndim != 1:
        raise ValueError(f"ofd_margin: bn_weight {tuple(bn_weight.shape)} and bn_bias {tuple(bn_bias.shape)} "
                         "must be (C,) vectors of one BatchNorm")
    s, m = bn_weight.detach().abs(), bn_bias.detach()
    tail = torch.special.ndtr(-m / s)
    pdf = torch.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi)
    expected = -s * pdf / tail.clamp_min(torch.finfo(tail.dtype).tiny) + m
    return torch.where(tail > 0.001, expected, -3 * s)


def ofd(student_preact: Tensor, teacher_preact: Tensor, margin: Tensor) -> Tensor:
    r"""OFD's partial L2 to the margin-ReLU'd teacher (Heo et al. 2019, eqs. 3 and 5).

    .. math::

        t' = \max(t, \text{margin}), \qquad
        L = \frac{1}{B}\sum_{b,c,h,w} (s - t')^2\, 1[(s > t') \lor (t' > 0)]

    ``margin`` is ``(C,)`` (:func:`ofd_margin`), broadcast over ``B, H, W``. The teacher is
    ``adaptive_avg_pool2d``-ed to the student's size when they differ (the authors' ImageNet code). The
    authors' ``distillation_loss`` sums; the division by the batch size is theirs too, while their
    ``1 / 2^(n-i-1)`` layer weights and ``/ 1000`` are the term's weight.

    Args:
        student_preact: ``(B, C, H, W)`` (through its connector), differentiable.
        teacher_preact: ``(B, C, H', W')``, the teacher's pre-ReLU map; detached.
        margin: ``(C,)`` (or the authors' ``(1, C, 1, 1)``); detached.

    Returns:
        0-d tensor.
    """
    _check_maps("ofd", student_preact, teacher_preact, same_size=False)
    if margin.numel() != student_preact.shape[1]:  # (C,), or the authors' (1, C, 1, 1)
        raise ValueError(f"ofd: margin {tuple(margin.shape)} must hold one value per channel "
                         f"({student_preact.shape[1]},)")
    s, t = student_preact, teacher_preact.detach()
    if t.shape[2:] != s.shape[2:]:
        t = F.adaptive_avg_pool2d(t, s.shape[2:])
    t = torch.maximum(t, margin.detach().to(t.dtype).reshape(-1, 1, 1))
    mask = ((s > t) | (t > 0)).to(s.dtype)
    return ((s - t).pow(2) * mask).sum() / s.shape[0]
