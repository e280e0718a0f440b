"""``.pt2``: a ``torch.export`` ExportedProgram, saved with ``torch.export.save``.

The batch dimension is dynamic (``Dim("batch")``); image side and channels are fixed. fkd's metadata
(:mod:`fkd.export.report`: input spec, classes, config) rides along as the extra file ``fkd.json``.
Loading needs only PyTorch: ``torch.export.load(path).module()(x)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fkd.export.input_spec import INPUT_NAME

SUFFIX = ".pt2"
METADATA_FILE = "fkd.json"


def batch_dynamic_shapes() -> dict:
    """Dynamic batch, everything else static, for an ``forward(x)`` module."""
    return {INPUT_NAME: {0: torch.export.Dim("batch", min=1)}}


def export_program(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """Trace ``module`` on ``example`` (B >= 2, so the batch size is not specialised) with a dynamic batch."""
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=batch_dynamic_shapes())


def write(module: nn.Module, example: torch.Tensor, path: Path, metadata: dict) -> None:
    """Export ``module`` (``forward(x)``) traced on ``example`` to ``path``, with fkd's ``metadata``."""
    program = export_program(module, example)
    torch.export.save(program, path, extra_files={METADATA_FILE: json.dumps(metadata)})


def load(path: Path, threads: int):
    """``(run, metadata)``: ``run(x: Tensor) -> logits Tensor`` and the saved fkd metadata (``{}`` if none)."""
    extra = {METADATA_FILE: ""}
    program = torch.export.load(path, extra_files=extra)
    module = program.module()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return run, json.loads(extra[METADATA_FILE] or "{}")


def input_shape(path: Path) -> list:
    """The input's shape as the file states it (``"batch"`` for the dynamic dimension)."""
    program = torch.export.load(path)
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == INPUT_NAME)
    return [d if isinstance(d, int) else "batch" for d in node.meta["val"].shape]
