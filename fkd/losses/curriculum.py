"""Curriculum temperature KD (CTKD): a learnable temperature trained adversarially through a gradient
reversal, its strength raised along a cosine curriculum.

Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023; the authors' code is
github.com/zhengli97/CTKD (``models/temp_global.py``: ``Global_T``, ``GradientReversalFunction``;
``train_student.py``: ``CosineDecay``; ``helper/loops.py``: ``T = t_start + t_end * sigmoid(...)``).
The KD itself is :func:`fkd.losses.soft_target_kl` at the tensor temperature.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Scalar = float | Tensor

__all__ = ["gradient_reversal", "ctkd_lambda", "ctkd_temperature"]


def gradient_reversal(x: Tensor, lam: Scalar) -> Tensor:
    r"""The identity forward; backward multiplies the incoming gradient by ``-lam`` (Ganin & Lempitsky 2015).

    Written as ``x + c (x - x.detach())`` with ``c = -(1 + lam)``: the forward adds an exact zero, so the
    value is ``x`` bit for bit, and ``d/dx = 1 + c = -lam``. Plain tensor ops, so it is correct under
    ``torch.func.grad``, ``vmap`` and ``torch.compile`` alike (the authors' ``autograd.Function`` without
    ``setup_context`` is not usable under ``torch.func``). No gradient reaches ``lam``.

    Args:
        x: any tensor.
        lam: the reversal's strength (float or 0-d tensor, e.g. :func:`ctkd_lambda`).
    """
    lam = lam.detach() if isinstance(lam, Tensor) else lam
    return x + (-(1.0 + lam)) * (x - x.detach())


def ctkd_lambda(epoch: Scalar, num_loops: float = 10.0, lam_max: float = 1.0, lam_min: float = 0.0) -> Tensor:
    r"""The cosine curriculum of the reversal's strength:
    ``lam(e) = lam_min + (lam_max - lam_min) (1 - cos(pi clip(e, 0, N) / N)) / 2``.

    The authors' ``CosineDecay(max_value=0, min_value=-1, num_loops=10).get_value(epoch)`` returns
    ``-lam(e)`` and their reversal multiplies the gradient by it; here the sign lives in
    :func:`gradient_reversal`. Their epochs count from 1 and the value changes once per epoch (the term
    passes ``floor(epoch) + 1``). A 0-d float tensor; no host sync.

    Args:
        epoch: epochs, float or 0-d tensor.
        num_loops: N, the epochs until ``lam`` reaches ``lam_max`` (the authors' ``--decay_loops 10``).
        lam_max, lam_min: the range.
    """
    e = torch.as_tensor(epoch)
    e = (e if e.is_floating_point() else e.float()).clamp(0.0, num_loops)
    return lam_min + (lam_max - lam_min) * (1.0 - torch.cos(math.pi * e / num_loops)) / 2.0


def ctkd_temperature(raw_temperature: Tensor, lam: Scalar, t_start: float = 1.0, t_range: float = 20.0) -> Tensor:
    r"""``T = t_start + t_range * sigmoid(GRL(raw, lam))``: the learnable temperature, in ``(t_start,
    t_start + t_range)``; its gradient w.r.t. ``raw`` is reversed (the temperature *maximises* the KD loss
    the student minimises). The authors' ``Global_T`` starts ``raw`` at 1 and calls the range ``t_end``
    (``--t_start 1 --t_end 20``).

    Args:
        raw_temperature: the learnable parameter (any shape; 0-d in fkd, ``(1,)`` in the authors' code).
        lam: the reversal strength (:func:`ctkd_lambda`).
    """
    return t_start + t_range * torch.sigmoid(gradient_reversal(raw_temperature, lam))
