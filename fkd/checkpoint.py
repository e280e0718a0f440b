"""Checkpoints: atomic writes, and loads that cannot execute code.

A checkpoint is a ``torch.save``d dict of tensors, numbers, strings, lists and dicts only, tagged with
``{"fkd": FORMAT, "kind": "teacher" | "student"}``. It is written to a temporary file in the same
folder, fsynced, and renamed over the target (``os.replace`` is atomic on POSIX), so a process killed at
any moment leaves either the old or the new file, never a torn one. It is read with
``torch.load(..., weights_only=True)``, which refuses pickled code (a planted ``__reduce__`` payload
fails to load instead of running).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from fkd.atomic import atomic_write
from fkd.errors import CheckpointError

FORMAT = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any], kind: str) -> Path:
    """Atomically write ``payload`` (tensors and plain data) to ``path``; returns the path."""
    data = {"fkd": FORMAT, "kind": kind, **payload}
    return atomic_write(path, lambda f: torch.save(data, f))


def load_checkpoint(
    path: str | Path, kind: str | None = None, map_location: Any = "cpu", *, mmap: bool = False
) -> dict[str, Any]:
    """Read an fkd checkpoint safely; raise :class:`CheckpointError` with a fix for every failure.

    ``mmap=True`` maps the tensors from the file instead of reading them into memory (large caches).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; check the path or train it first.")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; anything else is not ours
        raise CheckpointError(f"'{path}' is not a readable checkpoint (truncated or not a torch file).")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"'{path}' holds objects other than tensors and plain data, so it was not loaded "
            "(loading it could run code); use a checkpoint written by fkd."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError):
        raise CheckpointError(f"'{path}' is not a readable checkpoint (truncated or not a torch file).") from None
    if not isinstance(data, dict) or data.get("fkd") != FORMAT:
        raise CheckpointError(f"'{path}' is not an fkd checkpoint; pass a file written by `fkd teacher` or `fkd distill`.")
    if kind is not None and data.get("kind") != kind:
        raise CheckpointError(f"'{path}' is a {data.get('kind')} checkpoint, but a {kind} checkpoint is needed here.")
    return data
