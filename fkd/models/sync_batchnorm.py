"""Synchronised BatchNorm for data-parallel training: batch moments over every rank's slice.

In train mode BatchNorm normalises with the mean and variance of the batch. When the global batch is
split over ranks, per-rank moments would make the forward (and so the result) depend on the number of
ranks. :class:`SyncedBatchNorm` computes the moments of the *global* batch -- the semantics of
``torch.nn.SyncBatchNorm`` -- with one differentiable all-reduce per layer, inside the functional
forward: no hooks, no process-group state in the module beyond the group's name.

Each rank contributes its count ``n_r``, mean ``m_r`` and sum of squared deviations ``M2_r`` per
channel; they are gathered (rank ``r`` fills row ``r`` of a zero ``(W, 2C + 1)`` tensor, summed over
ranks) and combined with Chan et al.'s parallel formula (Chan, Golub & LeVeque 1979):

    n = sum_r n_r,   mean = sum_r n_r m_r / n,   M2 = sum_r [M2_r + n_r (m_r - mean)^2],   var = M2 / n,

which keeps the single-process precision (no ``E[x^2] - E[x]^2`` cancellation). Running statistics
are updated as ``nn.BatchNorm`` does: ``(1 - momentum) * running + momentum * batch`` with the unbiased
variance ``M2 / (n - 1)`` (a cumulative average when ``momentum`` is None).

:func:`with_synced_batchnorm` swaps these in for every BatchNorm of a model's *train* template (its
eval template, which uses the running statistics, is unchanged); the parameter and buffer names stay
the same, so params, buffers and checkpoints are interchangeable with the plain model's.
"""

from __future__ import annotations

import copy

import attrs
import torch
from torch import nn

from fkd.data_parallel import all_reduce_sum
from fkd.models.functional import Model


class SyncedBatchNorm(nn.Module):
    """A BatchNorm whose train-mode moments are those of the global batch over ``world_size`` ranks.

    Built from an existing ``nn.BatchNorm1d/2d/3d`` (its options, and meta-device weights of the same
    names); ``forward(x: (N, C, ...)) -> (N, C, ...)``.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, group_name: str, rank: int, world_size: int):
        super().__init__()
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.affine, self.track_running_stats = bn.affine, bn.track_running_stats
        self.group_name, self.rank, self.world_size = group_name, rank, world_size
        if bn.affine:
            self.weight = nn.Parameter(torch.empty_like(bn.weight, device="meta"))
            self.bias = nn.Parameter(torch.empty_like(bn.bias, device="meta"))
        if bn.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, torch.empty_like(getattr(bn, name), device="meta"))
        self.training = bn.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and self.track_running_stats:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False,
                                            0.0, self.eps)
        dims = [0, *range(2, x.ndim)]
        c = self.num_features
        n_local = x.numel() // c
        xf = x.float()
        mean_r = xf.mean(dims)
        m2_r = ((xf - mean_r.view(1, c, *[1] * (x.ndim - 2))) ** 2).sum(dims)
        row = torch.cat([xf.new_full((1,), float(n_local)), mean_r, m2_r])
        gathered = torch.zeros(self.world_size, 2 * c + 1, dtype=row.dtype, device=row.device)
        gathered = gathered.index_copy(0, torch.tensor([self.rank], device=row.device), row[None])
        gathered = all_reduce_sum(gathered, self.group_name)
        counts, means, m2s = gathered[:, :1], gathered[:, 1:c + 1], gathered[:, c + 1:]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        m2 = (m2s + counts * (means - mean) ** 2).sum(0)
        var = m2 / n
        shape = (1, c, *[1] * (x.ndim - 2))
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            with torch.no_grad():  # into the caller's buffer copies (see Model.apply)
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.float()
                unbiased = m2 / (n - 1).clamp(min=1)
                self.running_mean.copy_((1 - factor) * self.running_mean + factor * mean.detach())
                self.running_var.copy_((1 - factor) * self.running_var + factor * unbiased.detach())
        return y.to(x.dtype)


def _swap_batchnorms(module: nn.Module, group_name: str, rank: int, world_size: int) -> int:
    swapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, SyncedBatchNorm(child, group_name, rank, world_size))
            swapped += 1
        else:
            swapped += _swap_batchnorms(child, group_name, rank, world_size)
    return swapped


def with_synced_batchnorm(model: Model, group_name: str, rank: int, world_size: int) -> Model:
    """``model`` whose train template computes BatchNorm moments over all ranks (itself when it has none).

    Works for fkd's own CNNs and for torchvision FX extractors alike: both call their BatchNorm
    submodules by name, and the swap replaces those submodules in a copy of the template.
    """
    template = copy.deepcopy(model.train_template)
    if _swap_batchnorms(template, group_name, rank, world_size) == 0:
        return model
    return attrs.evolve(model, train_template=template)
