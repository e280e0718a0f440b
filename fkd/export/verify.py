"""Checking an exported file against fkd: its logits on test images, its accuracy on a whole split.

An fp32 export must reproduce ``Model.apply`` (eval mode) on the same images: every logit within
``atol + rtol * |reference|`` with ``atol = rtol = 1e-4`` (:func:`check_logits`). An int8 export
cannot, so its check is its accuracy on the whole test set (:func:`split_accuracy`).
"""

from __future__ import annotations

from typing import Callable

import torch

from fkd.data.transforms import normalize
from fkd.errors import ExportError

ATOL = 1e-4
RTOL = 1e-4

Runner = Callable[[torch.Tensor], torch.Tensor]


def fkd_logits(saved, x: torch.Tensor) -> torch.Tensor:
    """fkd's logits for exported-model inputs ``x`` (float32 (B, 3, S, S) = uint8 pixels / 255).

    The pixels are recovered exactly (``round(x * 255)``) and normalised by fkd's own data transform,
    so the reference is what training and ``fkd evaluate`` compute, not the exported graph's formula.
    """
    pixels = torch.round(x * 255).to(torch.uint8)
    with torch.no_grad():
        logits, _, _ = saved.model.apply(saved.params, saved.buffers, normalize(pixels, saved.config.data.normalize),
                                         train=False)
    return logits


def check_logits(run: Runner, reference: torch.Tensor, x: torch.Tensor, what: str) -> float:
    """Max |exported - reference| over the batch ``x``; ExportError when any logit is off by more than
    ``ATOL + RTOL * |reference|``."""
    out = run(x)
    if out.shape != reference.shape:
        raise ExportError(f"{what} returns logits of shape {tuple(out.shape)} instead of {tuple(reference.shape)}; "
                          "the export is wrong and was not kept.")
    diff = (out.float() - reference).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    if not bool(torch.all(diff <= ATOL + RTOL * reference.abs())):
        raise ExportError(f"{what} differs from fkd's model by up to {worst:.3g} in the logits (tolerance "
                          f"{ATOL:g} + {RTOL:g} x |logit|); the export is wrong and was not kept.")
    return worst


def split_accuracy(run: Runner, source, *, batch_size: int, num_classes: int) -> dict:
    """``{"accuracy", "per_class", "correct", "count"}`` of ``run`` over every batch of ``source``
    (inputs as the exported file takes them; ``per_class`` None for classes without images)."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for x, y, _ in source.batches(batch_size, shuffle=False):
        pred = run(x).argmax(dim=-1).to(torch.int64)
        confusion += torch.bincount(y.cpu() * num_classes + pred, minlength=num_classes ** 2).view(num_classes, -1)
    totals = confusion.sum(dim=1)
    correct, count = int(confusion.trace()), int(confusion.sum())
    per_class = [int(confusion[i, i]) / int(totals[i]) if totals[i] else None for i in range(num_classes)]
    return {"accuracy": correct / max(count, 1), "per_class": per_class, "correct": correct, "count": count}
