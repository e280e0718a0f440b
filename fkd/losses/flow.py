"""FSP: the flow of solution procedure between two layers (Yim et al., CVPR 2017, "A Gift from Knowledge
Distillation").

Source followed: RepDistiller's ``FSP`` (``distiller_zoo/FSP.py``).
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import einsum
from torch import Tensor

__all__ = ["fsp", "fsp_matrix"]


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    r"""The FSP matrix ``G = first . second^T / (H W)``: ``(B, C1, H, W), (B, C2, H', W') -> (B, C1, C2)``.

    ``G[b, i, j] = (1 / HW) sum_{h,w} first[b, i, h, w] second[b, j, h, w]`` (Yim et al. 2017, eq. 1). When
    the two maps differ in size, the larger is ``adaptive_avg_pool2d``-ed to the smaller's (RepDistiller
    pools by ``H``, to a square ``H x H``; fkd pools to ``min(H) x min(W)``, the same on square maps).
    """
    if first.ndim != 4 or second.ndim != 4:
        raise ValueError(f"fsp: expected (B, C, H, W) maps, got {tuple(first.shape)} and {tuple(second.shape)}")
    size = (min(first.shape[2], second.shape[2]), min(first.shape[3], second.shape[3]))
    if tuple(first.shape[2:]) != size:
        first = F.adaptive_avg_pool2d(first, size)
    if tuple(second.shape[2:]) != size:
        second = F.adaptive_avg_pool2d(second, size)
    return einsum(first, second, "b i h w, b j h w -> b i j") / (size[0] * size[1])


def fsp(student_first: Tensor, student_second: Tensor, teacher_first: Tensor, teacher_second: Tensor) -> Tensor:
    r"""FSP loss of one layer pair: ``mean_{b, i, j} (G_s[b, i, j] - G_t[b, i, j])^2``.

    ``G`` is :func:`fsp_matrix` of (first, second) on each side; the student's ``(C1, C2)`` must equal the
    teacher's (RepDistiller's FSP needs matching channel counts too). The mean over ``(B, C1, C2)`` is
    RepDistiller's ``(s - t).pow(2).mean()``; the paper's sum over layer pairs with ``lambda_i`` and its
    ``1/N`` are the term's (the ``fsp`` term sums over consecutive pairs, as RepDistiller does).

    Args:
        student_first, student_second: the student's two maps ``(B, C1, H, W)`` and ``(B, C2, H', W')``.
        teacher_first, teacher_second: the teacher's; detached.

    Returns:
        0-d tensor.
    """
    g_s = fsp_matrix(student_first, student_second)
    g_t = fsp_matrix(teacher_first.detach(), teacher_second.detach())
    if g_s.shape[1:] != g_t.shape[1:]:
        raise ValueError(f"fsp: the student's FSP matrix is {tuple(g_s.shape[1:])} but the teacher's is "
                         f"{tuple(g_t.shape[1:])}; pick layers with the same channel counts on both sides")
    return (g_s - g_t).pow(2).mean()
