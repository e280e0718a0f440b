"""The line or two a training command prints when it starts: what will happen, and where it goes.

The resolved config is not printed (it is written to ``config.toml`` in the run directory; ``--verbose``
or ``fkd config`` show it): a start says only which models train, for how long, on what, and where the
run is written. Each function returns the text; the command echoes it.
"""

from __future__ import annotations

from pathlib import Path

from fkd import distributed
from fkd.config import Config


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def _progress(done_epochs: int, total: int) -> str:
    """``"2 epochs"``, or ``"resuming after epoch 1 of 2"`` for a resumed run."""
    return _epochs(total) if done_epochs == 0 else f"resuming after epoch {done_epochs} of {total}"


def _where(run_path: Path, device) -> str:
    return f"device {device}{distributed.describe()}; run directory {run_path}"


def distill_start(cfg: Config, weights: dict[str, float], *, num_images: int, run_path: Path, device,
                  done_epochs: int = 0) -> str:
    """``distill: student seed_cnn, method feature (ce 0.7, feature 0.3), 8 epochs on digits (1,437 images);
    device cpu; run directory runs/feature``. ``weights``: the objective's term weights."""
    terms = ", ".join(f"{name} {w:g}" for name, w in weights.items())
    names = cfg.cohort.names
    if names:  # a cohort: its members' architectures
        archs = [(cfg.cohort.members.get(n) or cfg.student).arch for n in names]
        student = f"a cohort of {len(names)} students ({', '.join(dict.fromkeys(archs))})"
    else:
        student = f"student {cfg.student.arch}"
    return (f"distill: {student}, method {cfg.distill.preset} ({terms}), "
            f"{_progress(done_epochs, cfg.train.epochs)} on {cfg.data.name} ({num_images:,} images); "
            f"{_where(run_path, device)}")


def teacher_start(cfg: Config, *, checkpoint: Path, num_images: int, run_path: Path, device,
                  done_epochs: int = 0) -> str:
    """``teacher: fitting resnet18 (scratch), 5 epochs on digits (1,437 images) into
    runs/digits-teacher/teacher.pt; device cpu; run directory runs/digits-teacher``."""
    t = cfg.teacher
    return (f"teacher: fitting {t.arch} ({t.mode}), {_progress(done_epochs, t.train.epochs)} on {cfg.data.name} "
            f"({num_images:,} images) into {checkpoint}; {_where(run_path, device)}")


def teacher_missing(cfg: Config, checkpoint: Path) -> str:
    """The line that says a missing teacher is fitted before the student trains."""
    t = cfg.teacher
    return (f"teacher: checkpoint {checkpoint} not found: fitting the teacher first ({t.arch}, {t.mode}, "
            f"{_epochs(t.train.epochs)}; the [teacher] section)")


def teacher_loaded(arch: str, checkpoint: Path, accuracy: float | None) -> str:
    """``teacher: resnet18 loaded from runs/digits-teacher/teacher.pt (test accuracy 98.33%)``."""
    known = accuracy is not None and accuracy == accuracy  # NaN: a checkpoint that did not record it
    return f"teacher: {arch} loaded from {checkpoint}" + (f" (test accuracy {accuracy:.2%})" if known else "")
