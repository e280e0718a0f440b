"""CPU latency per image, measured so the figure can be read: with a stated thread count and batch size,
and marked when the machine was busier than its cores.

A latency without its thread count and batch size is not a figure: two OpenMP threads on a two-core
machine that other processes keep busy can run a small model a hundred times slower than one thread,
and per-image time falls with the batch. So every figure fkd prints or writes is a :func:`measure`
result, ``{"ms_per_image", "batch_size", "threads", "repeats", "load_1min", "cores", "busy", "text"}``,
and reads ``"1.30 ms/img, batch 1, 1 thread"`` (:func:`describe`). ``busy`` is true when the one-minute
load average (``os.getloadavg``, this process included) exceeded the CPU count when the timing ended:
the figure is then slower than the machine is when idle, and its text says so.

Timing is wall clock (``time.perf_counter``) around single calls after ``warmup`` untimed calls (first
calls allocate; onnxruntime finishes initialising); the median of ``repeats`` calls divided by the batch.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, Iterator

import torch

DEFAULT_THREADS = 1  # one thread: the figure a single-request server sees, and stable on a shared machine
DEFAULT_REPEATS = 20
WARMUP = 3


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine_load() -> tuple[float | None, int]:
    """``(one-minute load average or None where the OS has none, CPU count)``."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        load = None
    return load, os.cpu_count() or 1


def median_ms_per_image(run: Callable[[torch.Tensor], object], x: torch.Tensor, *, repeats: int,
                        warmup: int = WARMUP) -> float:
    """Median wall-clock milliseconds of ``run(x)`` over ``repeats`` (>= 1) calls, divided by ``len(x)``."""
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            run(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3 / len(x)


def measure(run: Callable[[torch.Tensor], object], x: torch.Tensor, *, threads: int = DEFAULT_THREADS,
            repeats: int = DEFAULT_REPEATS, warmup: int = WARMUP) -> dict:
    """Time ``run`` on the batch ``x`` (B, ...) with torch limited to ``threads`` threads; see the module
    docstring for the returned dict. A runtime with its own thread pool (onnxruntime) must be built
    with the same count by the caller."""
    with torch_threads(threads):
        ms = median_ms_per_image(run, x, repeats=repeats, warmup=warmup)
    return figure(ms, batch_size=len(x), threads=threads, repeats=repeats)


def figure(ms_per_image: float, *, batch_size: int, threads: int, repeats: int,
           load: tuple[float | None, int] | None = None) -> dict:
    """The latency dict of a measured ``ms_per_image``; ``load`` is :func:`machine_load` (read now if None)."""
    load_1min, cores = machine_load() if load is None else load
    result = {"ms_per_image": ms_per_image, "batch_size": batch_size, "threads": threads, "repeats": repeats,
              "load_1min": load_1min, "cores": cores, "busy": load_1min is not None and load_1min > cores}
    result["text"] = describe(result)
    return result


def describe(fig: dict) -> str:
    """``"1.30 ms/img, batch 1, 1 thread"``, with ``" (busy machine: load 3.1 on 2 cores, slower than idle)"``
    added when it was measured on a machine busier than its cores."""
    threads = fig["threads"]
    text = f"{fig['ms_per_image']:.2f} ms/img, batch {fig['batch_size']}, {threads} thread{'s' if threads != 1 else ''}"
    if fig.get("busy"):
        text += f" (busy machine: load {fig['load_1min']:.1f} on {fig['cores']} cores, slower than idle)"
    return text
