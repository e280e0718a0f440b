"""Exported files by suffix: how each format is written and read back.

:data:`FORMATS` is the one list (``--format`` choices and the suffixes ``fkd evaluate`` recognises
derive from it): ``pt2`` (:mod:`fkd.export.pt2_format`) and ``onnx`` (:mod:`fkd.export.onnx_format`).
Each format module provides ``SUFFIX``, ``write(module, example, path, metadata)``,
``load(path, threads) -> (run, metadata)`` and ``input_shape(path)``.
"""

from __future__ import annotations

import contextlib
import logging
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
    with held_logs("torch") as held:  # torch.export.load logs a damaged file's traceback before it raises
        try:
            return FORMATS[name].load(path, threads)
        except FkdError:
            raise
        except Exception as exc:  # a damaged or foreign file: its reader's own exception types vary
            logged = [r.exc_info[1] for r in held if r.exc_info and r.exc_info[1] is not None]
            cause = logged[-1] if logged else exc  # what went wrong, rather than "see the warnings above"
            reason = str(cause).strip().splitlines()[0].split(". ")[0] if str(cause).strip() else type(cause).__name__
            raise CheckpointError(f"'{path}' could not be read as an exported {name} model ({reason[:200]}); pass a "
                                  "file written by fkd export.") from None


class _Holder(logging.Handler):
    def __init__(self, records: list) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def held_logs(prefix: str):
    """Hold what the library's loggers (``prefix`` and ``prefix.*``) log, instead of printing it, while inside;
    yields the list of held records. A library that logs a traceback and then raises would otherwise print
    it above fkd's one-line error."""
    held: list = []
    holder = _Holder(held)
    loggers = [logging.getLogger(prefix)] + [logger for n, logger in logging.root.manager.loggerDict.items()
                                             if n.startswith(prefix + ".") and isinstance(logger, logging.Logger)]
    saved = [(logger, logger.handlers) for logger in loggers]
    for logger in loggers:  # loggers without handlers pass their records up to one that has the holder
        logger.handlers = [holder] if logger.handlers or logger is loggers[0] else []
    top_propagates = loggers[0].propagate
    loggers[0].propagate = False
    try:
        yield held
    finally:
        for logger, handlers in saved:
            logger.handlers = handlers
        loggers[0].propagate = top_propagates
