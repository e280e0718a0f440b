"""What ``fkd distill`` and ``fkd sweep`` share before training: the checked objective and student, and the
teacher (fitted when missing and allowed, loaded, its outputs cached).

Both commands are siblings over this module and :mod:`fkd.run_setup`; neither imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import attrs

from fkd import announce, distributed
from fkd import objective as objective_lib
from fkd.cache import build_cache, cache_key
from fkd.config import Config
from fkd.errors import CheckpointError
from fkd.models.from_config import build_student, build_teacher
from fkd.models.functional import feature_shapes
from fkd.objective import Objective
from fkd.rundir import RunDir
from fkd.teacher import fit_teacher, load_teacher, teacher_checkpoint_path
from fkd.terms import Shapes


def teacher_to_use(cfg: Config) -> Path:
    """The teacher checkpoint path, checked before anything is written: not a folder, and present unless
    ``teacher.fit_if_missing`` allows fitting it."""
    path = teacher_checkpoint_path(cfg)
    if not path.is_file() and not cfg.teacher.fit_if_missing:
        raise CheckpointError(
            f"teacher checkpoint '{path}' does not exist; fit it first with `fkd teacher --config ...`, "
            "or set teacher.fit_if_missing = true to fit it here."
        )
    return path


def ensure_teacher(cfg: Config, data, device, *, echo: Callable = print, quiet: bool = False) -> Path:
    """The teacher checkpoint path, fitting the teacher first when it is missing and allowed."""
    path = teacher_to_use(cfg)
    if distributed.world().from_main(path.is_file):  # under torchrun every rank follows rank 0's view
        return path
    echo(announce.teacher_missing(cfg, path))
    teacher_run = RunDir(path.parent)
    fit_teacher(cfg, data, device, teacher_run, resume=teacher_run.latest.exists(), quiet=quiet, echo=echo,
                announce=False)
    return path


@attrs.frozen(eq=False)
class Preflight:
    """The objective, the student and the shapes the terms are sized by, all checked."""

    objective: Objective
    student: object
    params: dict
    buffers: dict
    shapes: Shapes


def preflight(cfg: Config, num_classes: int, num_examples: int, device, objective: Objective | None = None) -> Preflight:
    """Build the objective and the student and check every term against the real shapes.

    Unknown feature names and unmatchable pairs fail here, in a second, instead of after a teacher fit.
    The teacher is built with random weights on the CPU only to read its feature shapes.
    """
    obj = objective if objective is not None else objective_lib.from_config(cfg.distill)  # built by fkd.build
    student, params, buffers = build_student(cfg, num_classes, obj.student_feature_names, device=device)
    s_shapes = t_shapes = {}
    if obj.needs_features:
        s_shapes = feature_shapes(student, params, buffers, cfg.data.image_size, device)
    if obj.needs_teacher_features:
        teacher, t_params, t_buffers = build_teacher(cfg, num_classes, obj.teacher_feature_names)
        t_shapes = feature_shapes(teacher, t_params, t_buffers, cfg.data.image_size, "cpu")
    shapes = Shapes(s_shapes, t_shapes, num_classes=num_classes, num_examples=num_examples)
    obj.check(shapes)
    return Preflight(obj, student, params, buffers, shapes)


@attrs.frozen(eq=False)
class Teacher:
    """A loaded teacher: its template, ``{"params", "buffers"}``, checkpoint path and recorded test accuracy."""

    model: object
    variables: dict
    path: Path
    accuracy: float | None


def load_teacher_for(cfg: Config, data, objective: Objective, device, *, echo: Callable = print,
                     quiet: bool = False) -> Teacher:
    """The teacher the objective consumes, fitted first when missing and ``teacher.fit_if_missing``."""
    present = distributed.world().from_main(teacher_checkpoint_path(cfg).is_file)
    path = ensure_teacher(cfg, data, device, echo=echo, quiet=quiet)
    model, variables, accuracy = load_teacher(path, cfg, data.num_classes, objective.teacher_feature_names, device)
    if present:  # a teacher fitted here has just said its accuracy
        echo(announce.teacher_loaded(cfg.teacher.arch, path, accuracy))
    return Teacher(model, variables, path, accuracy)


def teacher_cache(cfg: Config, data, teacher: Teacher, *, augment: bool, device, echo: Callable = print):
    """``(lookup, where)``: cached teacher outputs for the training split, ``lookup(idx) -> {...}`` merged
    into each batch, or ``(None, why not)`` when the teacher must run live (``teacher.cache = "off"``, a
    random training view, or function matching's mixed images)."""
    if cfg.data.mixes:
        return None, "off (the teacher runs live on the mixed view)"
    if cfg.teacher.cache == "off" or augment:
        return None, "off"
    key = cache_key(teacher.path, data.fingerprint, teacher.model.feature_names, cfg.train.precision)
    cache = build_cache(teacher.model, teacher.variables, data.train, mode=cfg.teacher.cache, key=key,
                        cache_dir=cfg.teacher.cache_dir, batch_size=cfg.data.eval_batch_size,
                        precision=cfg.train.precision, device=device, echo=echo,
                        max_bytes=int(cfg.teacher.cache_max_gb * 1e9))
    return cache.lookup, cache.where
