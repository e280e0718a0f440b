"""CPU latency figures say how they were measured: batch size, thread count, and a busy machine."""

from __future__ import annotations

import torch

from fkd import latency
from fkd.distill import latency_note
from fkd.export.latency import describe_table


def test_measure_names_batch_and_threads_and_restores_the_thread_count():
    before = torch.get_num_threads()
    seen = []
    fig = latency.measure(lambda x: seen.append(torch.get_num_threads()), torch.zeros(4, 3), threads=1, repeats=2)
    assert set(seen) == {1} and torch.get_num_threads() == before
    assert (fig["batch_size"], fig["threads"], fig["repeats"]) == (4, 1, 2) and fig["ms_per_image"] >= 0
    assert "ms/img, batch 4, 1 thread" in fig["text"] and fig["cores"] >= 1


def test_a_busy_machine_is_named_in_the_figure():
    idle = latency.figure(1.3, batch_size=1, threads=1, repeats=20, load=(0.5, 2))
    busy = latency.figure(1.3, batch_size=1, threads=2, repeats=20, load=(3.1, 2))
    assert idle["text"] == "1.30 ms/img, batch 1, 1 thread" and not idle["busy"]
    assert busy["busy"] and busy["text"].startswith("1.30 ms/img, batch 1, 2 threads")
    assert "busy machine: load 3.1 on 2 cores" in busy["text"]
    assert "batch 1, 2 threads" in latency_note([idle, busy]) and "busy machine" in latency_note([idle, busy])
    assert "busy" not in latency_note([idle])
    unknown = latency.figure(1.0, batch_size=1, threads=1, repeats=1, load=(None, 4))  # no getloadavg
    assert not unknown["busy"]


def test_export_latency_lines_name_batch_and_threads():
    table = {"threads": 1, "repeats": 5, "fkd": {"batch_1": 1.3, "batch_64": 0.2},
             "exported": {"batch_1": 0.9, "batch_64": 0.1}, "load_1min": 0.1, "cores": 2, "busy": False}
    lines = describe_table(table)
    assert lines[0] == "fkd       1.300 ms/img, batch 1, 1 thread; 0.200 ms/img, batch 64, 1 thread"
    assert len(lines) == 2
    assert "busy machine" in describe_table({**table, "load_1min": 5.0, "busy": True})[-1]
