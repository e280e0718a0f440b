"""User-facing errors.

Anything a user can cause (a typo in a config, a missing file, a wrong checkpoint) raises
:class:`FkdError` with one sentence that names the problem and the fix. The CLI turns it into
``error: <message>`` on stderr and exit code 2, never a traceback.
"""


class FkdError(Exception):
    """A problem the user can fix; its message is shown as is."""


class ConfigError(FkdError):
    """The configuration (file, ``--set`` override or CLI option) is invalid."""


class DataError(FkdError):
    """A data set is missing, empty or inconsistent."""


class CheckpointError(FkdError):
    """A checkpoint is missing, not fkd's, or does not fit the model."""


class TrainingError(FkdError):
    """Training stopped on a fault (e.g. a non-finite loss)."""


class WriteError(FkdError):
    """A file could not be written (disk full, file-size limit, permission lost); the old file is kept."""


class RunInUseError(FkdError):
    """Another fkd process is using the run directory (see :mod:`fkd.runlock`)."""


class ExportError(FkdError):
    """An exported model failed its check (its outputs differ from fkd's) or could not be written."""


def shorten(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis marks the cut), for quoting what a user typed in a
    one-line error however long it was."""
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"
