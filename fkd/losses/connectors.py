"""The learnable student-side modules of the feature-review and pre-activation methods, as pure functions of
their parameter dicts: a conv + BatchNorm connector (AB, OFD, SRRL) and ReviewKD's attention-based fusion
(ABF). A term keeps the parameters (``init_*``) in its params and applies them (the functions below).

Their BatchNorms normalise with the batch's own statistics and keep no running averages: these modules only
exist while training (they are dropped with the term), so there is no eval mode to serve.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["abf", "conv_bn", "init_abf", "init_conv_bn"]


def _kaiming_uniform(shape, a: float, generator) -> Tensor:
    w = torch.empty(shape)
    torch.nn.init.kaiming_uniform_(w, a=a, generator=generator)
    return w


def _batch_norm(x: Tensor, p: dict, prefix: str, eps: float = 1e-5) -> Tensor:
    return F.batch_norm(x, None, None, p[f"{prefix}weight"], p[f"{prefix}bias"], training=True, eps=eps)


def init_conv_bn(student_channels: int, teacher_channels: int, *, kernel_size: int = 1,
                 generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """``{"weight": (Ct, Cs, k, k), "bn_weight": ones, "bn_bias": zeros}``: a bias-free conv + BatchNorm,
    the conv drawn from ``N(0, 2 / (k^2 Ct))`` as the authors of AB and OFD initialise their connectors."""
    std = math.sqrt(2.0 / (kernel_size * kernel_size * teacher_channels))
    weight = torch.randn((teacher_channels, student_channels, kernel_size, kernel_size), generator=generator) * std
    return {"weight": weight, "bn_weight": torch.ones(teacher_channels), "bn_bias": torch.zeros(teacher_channels)}


def conv_bn(x: Tensor, params: dict, *, relu: bool = False, eps: float = 1e-5) -> Tensor:
    """``bn(conv(x))`` (``relu`` after it when asked): ``(B, Cs, H, W) -> (B, Ct, H, W)``, BN on batch statistics
    (biased variance, ``eps`` inside the square root), "same" padding for an odd kernel."""
    k = params["weight"].shape[-1]
    y = _batch_norm(F.conv2d(x, params["weight"], padding=(k - 1) // 2), params, "bn_", eps)
    return F.relu(y) if relu else y


def init_abf(in_channels: int, mid_channels: int, out_channels: int, *, fuse: bool,
             generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Parameters of one ReviewKD ABF, initialised as the authors' ``ABF.__init__``.

    ``conv1`` (1x1, ``in -> mid``, no bias) + BN, ``conv2`` (3x3, ``mid -> out``, no bias) + BN, both convs
    ``kaiming_uniform_(a=1)``; with ``fuse``, ``att`` (1x1, ``2 mid -> 2``, with bias, ``nn.Conv2d``'s default
    init) whose sigmoid weighs the level's own map against the deeper level's residual.
    """
    p = {"conv1": _kaiming_uniform((mid_channels, in_channels, 1, 1), 1.0, generator),
         "bn1_weight": torch.ones(mid_channels), "bn1_bias": torch.zeros(mid_channels),
         "conv2": _kaiming_uniform((out_channels, mid_channels, 3, 3), 1.0, generator),
         "bn2_weight": torch.ones(out_channels), "bn2_bias": torch.zeros(out_channels)}
    if fuse:
        p["att_weight"] = _kaiming_uniform((2, 2 * mid_channels, 1, 1), math.sqrt(5), generator)
        bound = 1 / math.sqrt(2 * mid_channels)
        p["att_bias"] = torch.empty(2).uniform_(-bound, bound, generator=generator)
    return p


def abf(x: Tensor, residual: Tensor | None, params: dict, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """One ABF step (the authors' ``ABF.forward``): ``(output (B, out, *out_size), residual for the next level)``.

    ``x`` is this level's student map ``(B, in, H, W)``; ``residual`` the deeper level's fused map (None at
    the deepest), nearest-upsampled to ``H x W`` and mixed with ``bn1(conv1(x))`` by the two attention maps
    ``sigmoid(att(cat))``. The output is ``bn2(conv2(.))`` of the fused map, nearest-resized to ``out_size``
    (the teacher's map size) first when it differs.
    """
    if x.ndim == 2:  # a pooled vector enters as a 1 x 1 map, as ReviewKD feeds its pooled feature
        x = x[:, :, None, None]
    y = _batch_norm(F.conv2d(x, params["conv1"]), params, "bn1_")
    if residual is not None:
        residual = F.interpolate(residual, size=tuple(y.shape[2:]), mode="nearest")
        att = torch.sigmoid(F.conv2d(torch.cat([y, residual], dim=1), params["att_weight"], params["att_bias"]))
        y = y * att[:, 0:1] + residual * att[:, 1:2]
    fused = y
    if tuple(y.shape[2:]) != tuple(out_size):
        y = F.interpolate(y, size=tuple(out_size), mode="nearest")
    return _batch_norm(F.conv2d(y, params["conv2"], padding=1), params, "bn2_"), fused
