"""The student and the teacher a config describes, as ``(model, params, buffers)``."""

from __future__ import annotations

from fkd.config import Config
from fkd.models import build_model


#: What the note of a replaced classifier head says happens to the new one, per teacher.mode.
NEW_HEAD = {"linear_probe": "teacher.mode = 'linear_probe' fits it on the frozen backbone",
            "finetune": "teacher.mode = 'finetune' trains it with the rest"}


def build_student(cfg: Config, num_classes: int, feature_names=(), *, device="cpu", echo=None):
    """The student of ``cfg`` returning ``feature_names`` -> ``(model, params, buffers)``, starting from
    ``student.weights`` (``echo`` receives the note when a weight file's head was replaced)."""
    s = cfg.student
    return build_model(s.arch, num_classes, cfg.data.image_size, feature_names, seed=cfg.seed, device=device,
                       weights=s.weights, weights_prefix=s.weights_prefix, weights_key="student.weights", echo=echo,
                       new_head="the student trains it with the rest", **s.options)


def build_teacher(cfg: Config, num_classes: int, feature_names=(), *, weights: str = "none", seed: int | None = None,
                  device="cpu", echo=None, new_head: str | None = "it is trained"):
    """The teacher architecture of ``cfg`` returning ``feature_names`` -> ``(model, params, buffers)``.

    ``weights``: ``"imagenet"``, ``"none"`` (random, from ``seed``, default the run's seed) or
    ``teacher.weights``'s file (its keys stripped of ``teacher.weights_prefix``; a head of another size is
    replaced, which ``echo`` hears about, unless ``new_head`` is None: a teacher used as it is must fit whole);
    a distillation run then loads the teacher checkpoint over them. With ``teacher.source = "ema"`` the
    teacher is the student's architecture (its weights are the average the train state keeps).
    """
    t = cfg.student if cfg.teacher.source == "ema" else cfg.teacher  # a mean teacher has the student's shape
    return build_model(t.arch, num_classes, cfg.data.image_size, feature_names, weights=weights,
                       seed=cfg.seed if seed is None else seed, device=device,
                       weights_prefix=t.weights_prefix, weights_key="teacher.weights", echo=echo,
                       new_head=new_head and NEW_HEAD.get(cfg.teacher.mode, new_head), **t.options)
