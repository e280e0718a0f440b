"""What a figure says it shows: the titles of ``curves.png`` and ``sweep.png``.

A plot read away from its run directory must still say which run it is: the run's folder, its config's
``name``, the student and the teacher it imitated (``student ← teacher``) and the method.
"""

from __future__ import annotations

from pathlib import Path

from fkd.config import Config


def teacher_name(cfg: Config) -> str:
    """``"teacher resnet18"``, ``"teachers a (resnet18) + b (wrn_40_2)"`` for an ensemble, or ``"a moving
    average of the student"`` for a mean teacher (``teacher.source = "ema"``)."""
    if cfg.teachers:
        return "teachers " + " + ".join(f"{name} ({t.arch})" for name, t in cfg.teachers.items())
    if cfg.teacher.source == "ema":
        return "a moving average of the student"
    return f"teacher {cfg.teacher.arch}"


def models(cfg: Config) -> str:
    """``"student seed_cnn ← teacher resnet18, method feature"`` (``"student seed_cnn alone, method none"``
    when the method consumes no teacher)."""
    method = cfg.distill.preset
    if method == "none":
        return f"student {cfg.student.arch} alone, method none"
    return f"student {cfg.student.arch} ← {teacher_name(cfg)}, method {method}"


def run_title(cfg: Config, run_path: Path, *, role: str = "student", needs_teacher: bool = True) -> str:
    """The title of a run's ``curves.png``; ``role`` is ``"student"`` (``fkd distill``) or ``"teacher"``.

    ``"runs/feature (config feature, digits): student seed_cnn ← teacher resnet18, method feature"``.
    """
    head = f"{run_path} (config {cfg.name}, {cfg.data.name})"
    if role == "teacher":
        return f"{head}: teacher {cfg.teacher.arch}, fitted {cfg.teacher.mode}"
    if not needs_teacher:
        return f"{head}: student {cfg.student.arch} alone, method {cfg.distill.preset}"
    return f"{head}: {models(cfg)}"


def sweep_title(cfg: Config, run_path: Path, seeds: tuple, *, interval: bool) -> str:
    """The title of ``sweep.png``: the sweep, its base config and models, and the seeds behind each point."""
    n = len(seeds)
    per_point = f"{n} seed{'s' if n != 1 else ''} per point ({', '.join(map(str, seeds))})"
    shown = "mean and 95% interval (clipped to 0..100)" if interval else "mean and each seed's value (no interval)"
    return f"{run_path} (config {cfg.name}, {cfg.data.name}): {models(cfg)}\n{per_point}; {shown}"
