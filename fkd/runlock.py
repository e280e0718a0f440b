"""One fkd process per run directory: an exclusive lock held for the whole command.

Two ``fkd distill`` (or ``teacher``) processes started on the same ``--out`` would interleave their
checkpoints and metrics. The first takes ``fcntl.flock`` on ``<run>/.fkd.lock`` and writes its PID
into it; a second gets a :class:`~fkd.errors.RunInUseError` naming that process. The kernel drops a
flock when its holder exits, however it exits (``kill -9`` included), so a lock file left behind is
stale and is simply taken over: no PID is ever guessed to be dead.

The file is deleted on release, while still locked; a process that opened it just before and locks
it just after would hold a lock on a deleted file, so after locking each process checks that the path
still names the file it locked, and tries again if not.

A refused command must leave the folder as it found it: :meth:`RunLock.release` also removes the
folders that :meth:`RunLock.acquire` created when they are still empty.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from fkd.errors import FkdError, RunInUseError

LOCK_NAME = ".fkd.lock"


class RunLock:
    """``with RunLock(folder): ...`` holds ``folder`` for this process (created when missing)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Create the folder if needed and lock it; RunInUseError when another process holds it."""
        self._created = [p for p in (self.folder, *self.folder.parents) if not p.exists()][::-1]
        for _ in range(100):  # retried only when another process released the lock at that very moment
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue  # the holder removed the (empty) folder as it released it: create it again
            except OSError as exc:
                self._remove_created()
                raise FkdError(f"cannot write to the run directory '{self.folder}' ({exc.strerror or exc}); "
                               "pick another with --out.") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                who = f"process {holder}" if holder else "another process"
                raise RunInUseError(
                    f"the run directory '{self.folder}' is in use by {who} (another fkd command writing to it); "
                    "wait for it to finish, or pick another directory with --out."
                ) from None
            if _names_file(self.path, fd):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return
            os.close(fd)  # locked a file its holder had just deleted: lock the one at the path now
        raise FkdError(f"could not lock the run directory '{self.folder}'; run the command again.")

    def release(self) -> None:
        """Unlock and delete the lock file; remove the folders :meth:`acquire` created if they are empty."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):  # innermost first; a folder with anything in it stays
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []


def _names_file(path: Path, fd: int) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
