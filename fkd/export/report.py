"""What an export states about its file: the metadata stored inside it and ``export.json`` beside it.

The metadata (:func:`file_metadata`) travels inside the exported file (``fkd.json`` in a ``.pt2``,
``metadata_props["fkd"]`` in an ``.onnx``): role, architecture, classes, input spec and the training
config, so ``fkd evaluate FILE`` can check the file later without its run.

``export.json`` holds one entry per exported file of its folder, keyed by file name (a student, its
int8 version and its teacher can share a folder); entries of files no longer there are dropped when
it is rewritten. An entry: format, quantization, input spec, opset, file size, parameter count,
verification, test accuracy of the exported model (and of fkd's model), and CPU latency per image at
batch 1 and 64 of fkd's model, the exported model and the teacher (None when not measured).
"""

from __future__ import annotations

import json
from pathlib import Path

from fkd.export.input_spec import InputSpec
from fkd.rundir import write_text_atomic

REPORT_NAME = "export.json"
METADATA_VERSION = 1


def file_metadata(saved, spec: InputSpec, class_names: list[str], quantization: dict | None) -> dict:
    """The metadata stored inside an exported file."""
    return {
        "fkd_export": METADATA_VERSION,
        "role": saved.role,
        "arch": saved.model.arch,
        "num_classes": saved.model.num_classes,
        "class_names": list(class_names),
        "params": sum(p.numel() for p in saved.params.values()),
        "input": spec.as_dict(),
        "quantization": quantization,
        "checkpoint": str(saved.checkpoint),
        "config": saved.config_text,
    }


def write_entry(path: Path, entry: dict) -> Path:
    """Add (or replace) ``path``'s entry in the ``export.json`` of its folder, atomically; returns that file."""
    report = path.parent / REPORT_NAME
    entries = {}
    if report.is_file():
        try:
            entries = json.loads(report.read_text())
        except ValueError:
            entries = {}  # a damaged report is rebuilt from this entry on
        entries = {name: e for name, e in entries.items() if isinstance(e, dict) and (path.parent / name).is_file()}
    entries[path.name] = entry
    write_text_atomic(report, json.dumps(entries, indent=2) + "\n")
    return report
