"""CPU latency per image of a classifier at a given batch size: the median over repeated calls.

Timing is wall-clock (``time.perf_counter``) around one call on a float32 (B, 3, S, S) input, after
``warmup`` untimed calls (first calls allocate and, for onnxruntime, finish initialising); the median
of ``repeats`` calls is divided by B. Torch and onnxruntime are given the same thread count, so their
numbers compare.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from fkd.export.input_spec import InputSpec

BATCH_SIZES = (1, 64)
WARMUP = 3


def latency_ms_per_image(run: Callable[[torch.Tensor], object], spec: InputSpec, batch_size: int, *,
                         repeats: int, warmup: int = WARMUP) -> float:
    """Median milliseconds per image of ``run`` on batches of ``batch_size`` (``repeats`` >= 1 timed calls)."""
    x = spec.example(batch_size)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            run(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3 / batch_size


def latency_table(run: Callable[[torch.Tensor], object], spec: InputSpec, *, repeats: int) -> dict:
    """``{"batch_1": ms per image, "batch_64": ms per image}`` (see :func:`latency_ms_per_image`)."""
    return {f"batch_{b}": latency_ms_per_image(run, spec, b, repeats=repeats) for b in BATCH_SIZES}
