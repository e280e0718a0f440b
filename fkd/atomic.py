"""Atomic file replacement: write a temporary file in the same folder, fsync it, rename it over.

``os.replace`` is atomic on POSIX, so a process killed at any moment leaves either the old or the new
file at ``path``, never a torn one; the folder is fsynced too so the rename itself survives a crash.

A write that fails (disk full, file-size limit, permission lost) removes its temporary file and raises
:class:`~fkd.errors.WriteError` naming the path and the cause; the old file is untouched. Only a
``kill -9`` can leave a temporary file behind (``.<name>.<random>.tmp``): a run removes those from its
own directory when it starts (:func:`remove_stale_temporaries`), holding the run's lock, so a live
writer's file is never taken away.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from fkd.errors import WriteError

TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary file, then atomically move it to ``path``.

    The new file gets the old one's permissions, or the usual ``0o666 & ~umask`` when there was none
    (``mkstemp`` alone would make every file private to its owner).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise WriteError(cannot_write(path, exc)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            _set_mode(f.fileno(), path)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error_in(exc)
        if cause is not None:
            raise WriteError(cannot_write(path, cause)) from None
        raise
    _fsync_dir(path.parent)
    return path


def cannot_write(path: Path, exc: OSError) -> str:
    """The one sentence for a failed write of ``path``: what failed, why, that nothing was lost, the fix."""
    reason = exc.strerror or str(exc)
    return (f"could not write '{path}' ({reason}); the file there before, if any, is unchanged. Free disk "
            "space, or fix the folder's permissions or the file-size limit (ulimit -f), then run the command "
            "again (with --resume for a training run).")


def remove_stale_temporaries(folder: str | Path, names: list[str]) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` leaves when killed mid-write of ``folder / name``
    for each of ``names`` (``.<name>.<random>.tmp``); nothing else is touched.

    Call it only while holding the folder's run lock (:mod:`fkd.runlock`): then no live writer owns any
    of them. Returns the paths removed.
    """
    removed = []
    for name in names:
        for entry in Path(folder).glob(f".{name}.*{TEMP_SUFFIX}"):
            if entry.is_file():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def _set_mode(fd: int, path: Path) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = 0o666 & ~_UMASK
    try:
        os.fchmod(fd, mode)
    except OSError:
        pass  # a file system without permissions (FAT, some network mounts): the file is still written


def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore, once at import
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, or one it was raised from or while handling (torch.save turns a
    failed ``write`` into a RuntimeError raised while handling the OSError)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)
