"""CPU latency per image of a classifier at batch 1 and 64, with a stated thread count.

The timing itself is :mod:`fkd.latency` (median of repeated calls after warm-up, divided by the batch).
Torch and onnxruntime are given the same thread count, so their numbers compare: an exported file is
timed through a runtime built with that count (:func:`exported_latency`, :func:`timed_runner`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from fkd import latency
from fkd.export.exported_file import load_exported
from fkd.export.input_spec import InputSpec

BATCH_SIZES = (1, 64)
WARMUP = latency.WARMUP


def latency_ms_per_image(run: Callable[[torch.Tensor], object], spec: InputSpec, batch_size: int, *,
                         repeats: int, warmup: int = WARMUP, threads: int = latency.DEFAULT_THREADS) -> float:
    """Median milliseconds per image of ``run`` on batches of ``batch_size`` (``repeats`` >= 1 timed calls),
    torch limited to ``threads`` threads."""
    fig = latency.measure(run, spec.example(batch_size), threads=threads, repeats=repeats, warmup=warmup)
    return fig["ms_per_image"]


def latency_table(run: Callable[[torch.Tensor], object], spec: InputSpec, *, repeats: int,
                  threads: int = latency.DEFAULT_THREADS) -> dict:
    """``{"batch_1": ms per image, "batch_64": ms per image}`` (see :func:`latency_ms_per_image`)."""
    return {f"batch_{b}": latency_ms_per_image(run, spec, b, repeats=repeats, threads=threads) for b in BATCH_SIZES}


def timed_runner(path: Path, run: Callable, threads: int) -> Callable:
    """``run`` (the file at ``path`` loaded with torch's thread count) as it must be timed with ``threads``:
    loaded again when the counts differ, since onnxruntime fixes its thread pool when it loads a file."""
    return run if threads == torch.get_num_threads() else load_exported(path, threads)[0]


def exported_latency(path: Path, run: Callable, spec: InputSpec, batch_size: int, *, threads: int,
                     repeats: int) -> dict:
    """The :func:`fkd.latency.measure` figure of the exported file at ``path`` on ``batch_size`` images."""
    return latency.measure(timed_runner(path, run, threads), spec.example(batch_size), threads=threads,
                           repeats=repeats)


def describe_table(table: dict) -> list[str]:
    """The lines ``fkd export`` prints for its latency table (``export.json``'s ``latency_ms_per_image``):
    one per model, each figure with its batch and thread count, and a warning when the machine was busy."""
    threads = table["threads"]
    per = f"{threads} thread{'s' if threads != 1 else ''}"
    lines = []
    for who in ("fkd", "exported", "teacher"):
        if who in table:
            figures = "; ".join(f"{table[who][f'batch_{b}']:.3f} ms/img, batch {b}, {per}" for b in BATCH_SIZES)
            lines.append(f"{who:<9} {figures}")
    if table.get("busy"):
        lines.append(f"busy machine (load {table['load_1min']:.1f} on {table['cores']} cores): "
                     "these figures are slower than idle")
    return lines
