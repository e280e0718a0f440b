"""The student and the teacher a config describes, as ``(model, params, buffers)``."""

from __future__ import annotations

from fkd.config import Config
from fkd.models import build_model


def build_student(cfg: Config, num_classes: int, feature_names=(), *, device="cpu"):
    """The student of ``cfg`` returning ``feature_names`` -> ``(model, params, buffers)``."""
    s = cfg.student
    return build_model(s.arch, num_classes, cfg.data.image_size, feature_names, seed=cfg.seed, device=device,
                       **s.options)


def build_teacher(cfg: Config, num_classes: int, feature_names=(), *, weights: str = "none", seed: int | None = None,
                  device="cpu"):
    """The teacher architecture of ``cfg`` returning ``feature_names`` -> ``(model, params, buffers)``.

    ``weights``: ``"imagenet"`` or ``"none"`` (random, from ``seed``, default the run's seed); a
    distillation run then loads the teacher checkpoint over them. With ``teacher.source = "ema"`` the
    teacher is the student's architecture (its weights are the average the train state keeps).
    """
    t = cfg.student if cfg.teacher.source == "ema" else cfg.teacher  # a mean teacher has the student's shape
    return build_model(t.arch, num_classes, cfg.data.image_size, feature_names, weights=weights,
                       seed=cfg.seed if seed is None else seed, device=device, **t.options)
