"""Distillation on feature maps: neuron selectivity transfer (NST) and variational information distillation (VID).

Maps are ``(B, C, H, W)``; student and teacher may differ in channels and, for NST and VID's
pooling, in resolution. The teacher is detached.

Sources and the reference code followed
---------------------------------------
``nst``                         Huang & Wang 2017, "Like What You Like"   RepDistiller ``NSTLoss``
``vid_nll``, ``vid_regressor``  Ahn et al., CVPR 2019                     RepDistiller ``VIDLoss``
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor

__all__ = ["init_vid_params", "nst", "pool_to_common_size", "vid_nll", "vid_regressor"]


def pool_to_common_size(student_feat: Tensor, teacher_feat: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two ``(B, C, H, W)`` maps to the smaller one's resolution.

    Both go to ``(min(Hs, Ht), min(Ws, Wt))`` with ``F.adaptive_avg_pool2d`` (a no-op on a map already
    that size). For square maps this is the reference code's rule (pool whichever has the larger ``H``
    to the other's ``H x H``); vectors ``(B, C)`` pass through unchanged.
    """
    if student_feat.ndim == 2 and teacher_feat.ndim == 2:
        return student_feat, teacher_feat
    if student_feat.ndim != 4 or teacher_feat.ndim != 4:
        raise ValueError(f"expected two (B, C, H, W) maps, got {tuple(student_feat.shape)} and "
                         f"{tuple(teacher_feat.shape)}")
    size = (min(student_feat.shape[2], teacher_feat.shape[2]), min(student_feat.shape[3], teacher_feat.shape[3]))
    pooled = [f if tuple(f.shape[2:]) == size else F.adaptive_avg_pool2d(f, size) for f in (student_feat, teacher_feat)]
    return pooled[0], pooled[1]


def _squared_poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """``mean_{n, i, j} (a_{n,i} . b_{n,j})^2`` over channel vectors ``a_{n,i}``, ``b_{n,j}`` of length HW."""
    return einsum(a, b, "n i hw, n j hw -> n i j").pow(2).mean()


def nst(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    r"""Neuron selectivity transfer: squared MMD between the channels' spatial distributions.

    Each channel's map, flattened to length ``HW`` and L2-normalised, is one sample; with the
    polynomial kernel ``k(x, y) = (x^\top y)^2``:

    .. math::

        L = \frac{1}{B} \sum_b \Big( \frac{1}{C_t^2}\sum_{i,j} k(t_i, t_j) + \frac{1}{C_s^2}\sum_{i,j} k(s_i, s_j)
            - \frac{2}{C_s C_t}\sum_{i,j} k(s_i, t_j) \Big)

    Source: Huang & Wang 2017, eqs. 4-6 with the polynomial kernel (``d = 2, c = 0``), as in
    RepDistiller's ``NSTLoss`` (full loss, teacher-teacher term detached). The larger map is
    average-pooled to the smaller one's size first (:func:`pool_to_common_size`). Channel counts may
    differ. The paper's weight ``lambda/2`` is the term's weight, not applied here.

    Args:
        student_feat: ``(B, C_s, H_s, W_s)``.
        teacher_feat: ``(B, C_t, H_t, W_t)``; detached.

    Returns:
        0-d tensor, ``>= 0``.
    """
    if student_feat.ndim != 4 or teacher_feat.ndim != 4 or student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(f"nst: expected (B, C, H, W) maps with the same B, got {tuple(student_feat.shape)} "
                         f"and {tuple(teacher_feat.shape)}")
    f_s, f_t = pool_to_common_size(student_feat, teacher_feat.detach())
    s = F.normalize(rearrange(f_s, "b c h w -> b c (h w)"), p=2.0, dim=2)
    t = F.normalize(rearrange(f_t, "b c h w -> b c (h w)"), p=2.0, dim=2)
    return _squared_poly_kernel_mean(t, t) + _squared_poly_kernel_mean(s, s) - 2.0 * _squared_poly_kernel_mean(s, t)


def vid_nll(pred_mean: Tensor, teacher_feat: Tensor, log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    r"""VID's Gaussian negative log-likelihood of the teacher's feature under the student's prediction.

    .. math::

        \sigma_c^2 = \mathrm{softplus}(\alpha_c) + \epsilon, \qquad
        L = \mathrm{mean}_{b,c,h,w}\; \frac12 \Big( \frac{(\mu_{b,c,h,w} - t_{b,c,h,w})^2}{\sigma_c^2}
            + \log \sigma_c^2 \Big)

    Source: Ahn et al. 2019, eq. 5 (a Gaussian with a mean from a regressor on the student's feature
    and one learned variance per teacher channel); the constant ``log(2 pi) / 2`` is dropped and the
    sum is a mean over every element, as in RepDistiller's ``VIDLoss``
    (``log(1 + exp(alpha)) + eps``, computed here as a stable softplus).

    Args:
        pred_mean: ``(B, C, H, W)`` or ``(B, C)``: the regressor's output on the student feature
            (see :func:`vid_regressor`); gradients flow into it.
        teacher_feat: same shape; detached.
        log_scale: ``(C,)``, the unconstrained per-channel ``alpha``; gradients flow into it.
        eps: floor added to the variance.

    Returns:
        0-d tensor (nats per element, up to the dropped constant).
    """
    if pred_mean.shape != teacher_feat.shape or pred_mean.ndim < 2 or log_scale.shape != pred_mean.shape[1:2]:
        raise ValueError(f"vid_nll: pred_mean {tuple(pred_mean.shape)} and teacher_feat {tuple(teacher_feat.shape)} "
                         f"must have the same (B, C, ...) shape and log_scale {tuple(log_scale.shape)} must be (C,)")
    var = F.softplus(log_scale) + eps
    var = var.reshape(var.shape + (1,) * (pred_mean.ndim - 2))  # channel axis of (B, C, ...)
    return (0.5 * ((pred_mean - teacher_feat.detach()).pow(2) / var + var.log())).mean()


def init_vid_params(
    student_channels: int,
    teacher_channels: int,
    *,
    generator: torch.Generator,
    init_variance: float = 5.0,
    eps: float = 1e-5,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    r"""VID's learnable parts for one feature pair: RepDistiller's regressor and the per-channel log-scale.

    The regressor is ``VIDLoss``'s stack of three bias-free 1x1 convolutions with ReLUs in between,
    ``C_s -> C_t -> C_t -> C_t`` (RepDistiller builds it with ``mid = C_t``), stored as
    ``{"w1": (C_t, C_s), "w2": (C_t, C_t), "w3": (C_t, C_t)}`` matrices over the channel axis and
    initialised as ``nn.Conv2d`` is, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``. ``log_scale`` ``(C_t,)`` starts
    where ``softplus(log_scale) + eps = init_variance`` (5 in the reference).

    Returns:
        fresh tensors drawn from ``generator`` only (never the global RNG), ``requires_grad=False``.
    """
    if student_channels < 1 or teacher_channels < 1 or not init_variance > eps:
        raise ValueError(f"init_vid_params: need positive channel counts and init_variance > eps, got "
                         f"{student_channels}, {teacher_channels}, {init_variance}")

    def uniform(out: int, fan_in: int) -> Tensor:
        bound = 1.0 / math.sqrt(fan_in)
        return (torch.rand(out, fan_in, generator=generator, dtype=dtype) * 2.0 - 1.0) * bound

    c_s, c_t = student_channels, teacher_channels
    log_scale = math.log(math.expm1(init_variance - eps))  # the inverse of softplus
    return {
        "w1": uniform(c_t, c_s),
        "w2": uniform(c_t, c_t),
        "w3": uniform(c_t, c_t),
        "log_scale": torch.full((c_t,), log_scale, dtype=dtype),
    }


def _channel_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """A bias-free 1x1 convolution (a linear map for ``(B, C)``): ``weight (O, C)`` over axis 1."""
    return einsum(x, weight, "b c ..., o c -> b o ...")


def vid_regressor(student_feat: Tensor, params: dict[str, Tensor]) -> Tensor:
    """``w3 . relu(w2 . relu(w1 . x))`` over the channel axis of ``(B, C_s, ...)``: VID's predicted mean.

    ``params`` from :func:`init_vid_params` (its ``log_scale`` is not used here).
    """
    h = F.relu(_channel_matmul(student_feat, params["w1"]))
    h = F.relu(_channel_matmul(h, params["w2"]))
    return _channel_matmul(h, params["w3"])
