"""Data parallelism inside the pure step: one global batch split over ranks, one gradient.

Every rank holds the same train state and takes its own share of each global batch: every W-th
example from position ``rank`` (:meth:`fkd.distributed.World.interleaved`), so that each rank holds its
proportion of a batch laid out in blocks (a transfer-set batch: labeled examples first). The single-process loss is the mean over the global batch of
``B`` examples; rank ``r`` with ``B_r`` of them computes the mean ``L_r`` over its slice, so

    L = (1 / B) * sum_i l_i = sum_r (B_r / B) * L_r        and        dL/dθ = sum_r (B_r / B) * dL_r/dθ.

Each rank therefore differentiates its *share* ``(B_r / B) * L_r`` and the shares' gradients are summed
over ranks (an all-reduce of one flat buffer holding every gradient, the share-weighted loss and term
metrics, and the correct/count tallies): the result is the single-process gradient of the global batch,
for any split, as long as the loss is a mean of per-example terms (CE, logit KD, feature and attention
terms are). Synchronised BatchNorm (:mod:`fkd.models.sync_batchnorm`) makes the forward itself the
global one, and its backward sums the shares' gradients through the batch moments.

The collectives are ``torch.ops._c10d_functional`` ops: they return new tensors, take no part of the
caller's state, and trace under ``torch.compile``. They are wrapped in :class:`_AllReduceSum`, an
``autograd.Function`` with ``setup_context``, because ``torch.func.grad`` does not accept the op's own
registered autograd formula; its backward is the all-reduce of the incoming gradient (the adjoint of a
sum over ranks).
"""

from __future__ import annotations

import attrs
import torch

from fkd.pytree import tree_leaves, tree_map


def _all_reduce_sum(t: torch.Tensor, group_name: str) -> torch.Tensor:
    ops = torch.ops._c10d_functional
    return ops.wait_tensor(ops.all_reduce(t, "sum", group_name))


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable (backward: the sum over ranks of the gradient), usable under torch.func."""

    generate_vmap_rule = True

    @staticmethod
    def forward(t: torch.Tensor, group_name: str) -> torch.Tensor:
        return _all_reduce_sum(t, group_name)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.group_name = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllReduceSum.apply(grad, ctx.group_name), None


def all_reduce_sum(t: torch.Tensor, group_name: str) -> torch.Tensor:
    """``sum_r t_r`` over the ranks of ``group_name``: a new tensor, differentiable, traceable."""
    return _AllReduceSum.apply(t, group_name)


@attrs.frozen
class DataParallel:
    """How a step combines its rank's slice with the others'.

    ``global_batch`` is ``data.batch_size`` (the batch one process would take); ``group_name`` names
    the process group (:attr:`fkd.distributed.World.group_name`).
    """

    group_name: str
    global_batch: int

    def share(self, local_batch: int) -> float:
        """``B_r / B``: this rank's weight in the global mean (a Python number: batch shapes are static)."""
        return local_batch / self.global_batch

    def reduce(self, grads: dict, loss: torch.Tensor, metrics: dict, correct: torch.Tensor,
               count: torch.Tensor) -> tuple[dict, torch.Tensor, dict, torch.Tensor, torch.Tensor]:
        """Sum over ranks of the share-weighted ``grads``, ``loss`` and term ``metrics`` (already weighted
        by the caller) and of the ``correct`` / ``count`` tallies -- one all-reduce of one flat fp32 buffer.

        Counts travel as fp32, exact up to 2**24 examples per step.
        """
        leaves = tree_leaves(grads)
        names = sorted(metrics)
        scalars = [loss.float(), *(metrics[k].float() for k in names), correct.float(), count.float()]
        flat = torch.cat([g.reshape(-1).float() for g in leaves] + [s.reshape(1) for s in scalars])
        summed = _all_reduce_sum(flat, self.group_name)
        out, at = [], 0
        for g in leaves:
            out.append(summed[at:at + g.numel()].view(g.shape).to(g.dtype))
            at += g.numel()
        it = iter(out)
        grads = tree_map(lambda g: next(it), grads)
        tail = summed[at:]
        loss = tail[0].to(loss.dtype)
        metrics = {k: tail[1 + i].to(metrics[k].dtype) for i, k in enumerate(names)}
        correct = tail[-2].round().to(correct.dtype)
        count = tail[-1].round().to(count.dtype)
        return grads, loss, metrics, correct, count
