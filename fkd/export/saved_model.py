"""The model behind ``fkd export PATH``: a student (or, when asked for, a teacher) as it was trained.

PATH is a run directory or a checkpoint file. Checkpoints tell their role by their ``kind``
(:mod:`fkd.checkpoint`): ``student_run`` (a ``distill`` run's ``checkpoints/latest.pt``, or a student a
sweep saved with ``--save``) holds a student; ``teacher`` (``teacher.pt``) and ``teacher_run`` (a
``teacher`` run's ``checkpoints/latest.pt``) hold a teacher. Export expects a student unless
``teacher=True``; then a student run stands for the teacher it was distilled from (its config's
``teacher.checkpoint``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import attrs

from fkd.checkpoint import load_checkpoint
from fkd.config import Config, from_dict
from fkd.errors import CheckpointError
from fkd.evaluate import saved_model
from fkd.models import Model

ROLE_OF_KIND = {"student_run": "student", "teacher": "teacher", "teacher_run": "teacher"}


@attrs.frozen(eq=False)
class SavedModel:
    """A trained model read from a checkpoint: the template, its weights and the config it was trained with.

    ``role`` is ``"student"`` or ``"teacher"``; ``config_text`` is the saved config as TOML.
    """

    checkpoint: Path
    role: str
    model: Model
    params: dict
    buffers: dict
    config: Config
    config_text: str

    @property
    def default_stem(self) -> str:
        """A file name stem for its export: the role for a run's own checkpoint, else the file's stem."""
        return self.role if self.checkpoint.name in ("latest.pt", "teacher.pt") else self.checkpoint.stem

    @property
    def run_dir(self) -> Path:
        """The run directory the checkpoint belongs to (``<run>/checkpoints/latest.pt`` -> ``<run>``)."""
        parent = self.checkpoint.parent
        return parent.parent if parent.name == "checkpoints" else parent


def load_saved_model(path: str | Path, *, teacher: bool = False) -> SavedModel:
    """Read the student at ``path`` (the teacher with ``teacher=True``); CheckpointError for anything else.

    Raises:
        CheckpointError: PATH is missing, not an fkd checkpoint, not a model checkpoint, or a teacher
            where a student is expected (and the reverse), each with the fix.
    """
    ckpt = _checkpoint_file(Path(path), teacher)
    data = load_checkpoint(ckpt)
    role = ROLE_OF_KIND.get(data.get("kind"))
    if role is None:
        raise CheckpointError(f"'{ckpt}' is a {data.get('kind')} file, not a model checkpoint; pass a distill run "
                              "directory or a student checkpoint (a sweep's students are the files its --save "
                              "writes to students/).")
    if role == "teacher" and not teacher:
        raise CheckpointError(f"'{ckpt}' holds a teacher, but export expects a student (a distill run directory or "
                              "its checkpoints/latest.pt); pass --teacher to export the teacher for comparison.")
    if role == "student" and teacher:
        ckpt = _teacher_of(ckpt, data)
        data = load_checkpoint(ckpt)
        role = ROLE_OF_KIND.get(data.get("kind"))
        if role != "teacher":
            raise CheckpointError(f"'{ckpt}' (the run's teacher.checkpoint) does not hold a teacher; pass the "
                                  "teacher's checkpoint itself.")
    model, params, buffers = saved_model(ckpt, data)
    cfg = from_dict(tomllib.loads(data["config"]))
    return SavedModel(checkpoint=ckpt, role=role, model=model, params=params, buffers=buffers, config=cfg,
                      config_text=data["config"])


def _checkpoint_file(path: Path, teacher: bool) -> Path:
    if path.is_dir():
        candidates = [path / "teacher.pt"] if teacher else []
        candidates.append(path / "checkpoints" / "latest.pt")
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise CheckpointError(f"'{path}' holds no checkpoint (checkpoints/latest.pt); pass a run directory "
                                  "written by fkd distill or a checkpoint file.")
        return found
    if not path.exists():
        raise CheckpointError(f"'{path}' does not exist; pass a run directory or a checkpoint file.")
    return path


def _teacher_of(student_ckpt: Path, data: dict) -> Path:
    """The teacher checkpoint a student run was distilled from (its config's ``teacher.checkpoint``)."""
    cfg = from_dict(tomllib.loads(data["config"]))
    teacher = Path(cfg.teacher.checkpoint)
    if not teacher.is_file():
        raise CheckpointError(f"'{student_ckpt}' holds a student whose teacher '{teacher}' does not exist (paths in "
                              "a config are relative to where fkd runs); pass the teacher's checkpoint with --teacher.")
    return teacher
