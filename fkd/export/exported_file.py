"""Exported files by suffix: how each format is written and read back.

:data:`FORMATS` is the one list (``--format`` choices and the suffixes ``fkd evaluate`` recognises
derive from it): ``pt2`` (:mod:`fkd.export.pt2_format`) and ``onnx`` (:mod:`fkd.export.onnx_format`).
Each format module provides ``SUFFIX``, ``write(module, example, path, metadata)``,
``load(path, threads) -> (run, metadata)`` and ``input_shape(path)``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from fkd.errors import CheckpointError, ConfigError, FkdError
from fkd.export import onnx_format, pt2_format

FORMATS: dict[str, ModuleType] = {"pt2": pt2_format, "onnx": onnx_format}


def format_of(path: str | Path) -> str | None:
    """The format name of an exported file by its suffix, or None when it is not one."""
    suffix = Path(path).suffix.lower()
    return next((name for name, fmt in FORMATS.items() if fmt.SUFFIX == suffix), None)


def is_exported_file(path: str | Path) -> bool:
    """True for a file named like an exported model (``.pt2``, ``.onnx``)."""
    return format_of(path) is not None


def format_module(name: str) -> ModuleType:
    """The module of format ``name``; ConfigError naming the valid ones otherwise."""
    if name not in FORMATS:
        raise ConfigError(f"--format {name} is not a known export format; use {' or '.join(FORMATS)}.")
    return FORMATS[name]


def load_exported(path: str | Path, threads: int):
    """``(run, metadata)`` of an exported file: ``run(x) -> logits`` in its own runtime (PyTorch for
    ``.pt2``, onnxruntime for ``.onnx``) and the metadata fkd stored in it (``{}`` for foreign files)."""
    path = Path(path)
    name = format_of(path)
    if name is None:
        raise ConfigError(f"'{path}' is not an exported model; its name must end in "
                          f"{' or '.join(f.SUFFIX for f in FORMATS.values())}.")
    if not path.is_file():
        raise CheckpointError(f"'{path}' does not exist; pass a file written by fkd export.")
    try:
        return FORMATS[name].load(path, threads)
    except FkdError:
        raise
    except Exception as exc:  # a damaged or foreign file: its reader's own exception types vary
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"'{path}' could not be read as an exported {name} model ({reason[:200]}); pass a file "
                              "written by fkd export.") from None
