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

from fkd.errors import ConfigError
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


def read_entries(folder: Path) -> dict:
    """The entries of ``folder/export.json`` (``{}`` when there is none), read before anything is exported.

    A file there that fkd did not write -- not JSON, not a table of entries, or entries without a format and
    role -- is refused with a :class:`ConfigError`: rewriting it would destroy someone else's file.
    """
    report = folder / REPORT_NAME
    if not report.exists():
        return {}
    try:
        entries = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # a folder, unreadable, not UTF-8, not JSON
        entries = exc
    if not (isinstance(entries, dict) and all(isinstance(e, dict) and {"format", "role"} <= set(e)
                                              for e in entries.values())):
        raise ConfigError(f"'{report}' is not an export report written by fkd export, so it is not rewritten; "
                          "move it away, or export to another folder with --out.")
    return entries


def write_entry(path: Path, entry: dict) -> Path:
    """Add (or replace) ``path``'s entry in the ``export.json`` of its folder, atomically; returns that file.
    Entries of files no longer there are dropped."""
    report = path.parent / REPORT_NAME
    entries = {name: e for name, e in read_entries(path.parent).items() if (path.parent / name).is_file()}
    entries[path.name] = entry
    write_text_atomic(report, json.dumps(entries, indent=2) + "\n")
    return report
