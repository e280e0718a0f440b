"""What ``fkd distill`` and ``fkd sweep`` share before training: the checked objective and student, and the
teacher (fitted when missing and allowed, loaded, its outputs cached).

Both commands are siblings over this module and :mod:`fkd.run_setup`; neither imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import attrs
import torch

from fkd import announce, distributed
from fkd import objective as objective_lib
from fkd.cache import build_cache, cache_key
from fkd.config import CohortConfig, Config, dumps
from fkd.errors import CheckpointError, ConfigError
from fkd.models.cohort import Cohort
from fkd.models.ensemble import SEP, TeacherEnsemble, split_features
from fkd.models.from_config import build_student, build_teacher
from fkd.models.functional import feature_shapes
from fkd.models.zoo import head_prefix
from fkd.objective import Objective
from fkd.pytree import tree_map
from fkd.rundir import RunDir
from fkd.evaluate import evaluate_model
from fkd.teacher import fit_teacher, load_teacher, teacher_checkpoint_path, weights_as_teacher
from fkd.terms import Shapes


def ema_decay(cfg: Config) -> float | None:
    """The mean teacher's decay when ``teacher.source = "ema"``, else None (a teacher from a checkpoint)."""
    return cfg.teacher.decay if cfg.teacher.source == "ema" else None


def member_configs(cfg: Config) -> dict[str, Config]:
    """``{name: cfg with [teacher] = [teachers.<name>]}`` for an ensemble; ``{}`` for one teacher. Each is a
    one-teacher config, so fitting, loading and caching a member are what they are for one teacher."""
    return {name: attrs.evolve(cfg, teacher=t, teachers={}) for name, t in cfg.teachers.items()}


def teacher_paths(cfg: Config, run: RunDir | None = None) -> list[Path]:
    """Every teacher checkpoint of ``cfg`` (one, or one per ensemble member), checked as :func:`teacher_to_use`;
    two members may not share a checkpoint."""
    members = member_configs(cfg)
    if not members:
        return [teacher_to_use(cfg, run)]
    paths = {name: teacher_to_use(c, run) for name, c in members.items()}
    seen: dict[Path, str] = {}
    for name, path in paths.items():
        if path.resolve() in seen:
            raise ConfigError(f"teachers.{seen[path.resolve()]} and teachers.{name} have the same checkpoint "
                              f"'{path}'; give each teacher its own teacher.checkpoint file.")
        seen[path.resolve()] = name
    return list(paths.values())


def teacher_to_use(cfg: Config, run: RunDir | None = None) -> Path:
    """The teacher checkpoint path, checked before anything is written: not a folder, present unless
    ``teacher.fit_if_missing`` allows fitting it, and -- when it is missing -- not inside ``run``, the
    directory of the command that would fit it (the fit would need the lock that command holds)."""
    path = teacher_checkpoint_path(cfg)
    if not path.is_file() and not cfg.teacher.fit_if_missing:
        raise CheckpointError(
            f"teacher checkpoint '{path}' does not exist; fit it first with `fkd teacher --config ...`, "
            "or set teacher.fit_if_missing = true to fit it here."
        )
    if run is not None and not path.is_file() and path.parent.resolve() == run.path.resolve():
        raise ConfigError(f"teacher.checkpoint '{path}' is in the run directory, where the missing teacher "
                          "would be fitted too; set it to a file in another folder.")
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


def preflight(cfg: Config, num_classes: int, num_examples: int, device, objective: Objective | None = None,
              echo: Callable | None = None) -> Preflight:
    """Build the objective and the student and check every term against the real shapes.

    Unknown feature names, unmatchable pairs and terms that do not return a 0-d loss fail here, in a second,
    instead of after a teacher fit.
    The teacher is built with random weights on the CPU only to read its feature shapes. ``echo`` hears
    the note when ``student.weights``' head was replaced.
    """
    obj = objective if objective is not None else objective_lib.from_config(cfg.distill)  # built by fkd.build
    student, params, buffers = build_students(cfg, num_classes, obj.student_feature_names, device=device, echo=echo)
    s_shapes = t_shapes = {}
    if obj.needs_features:
        s_shapes = feature_shapes(student, params, buffers, cfg.data.image_size, device)
    t_params, t_head = {}, ""
    if obj.needs_teacher_features:
        teacher, t_params, t_buffers = build_teachers(cfg, num_classes, obj.teacher_feature_names)
        t_shapes = feature_shapes(teacher, t_params, t_buffers, cfg.data.image_size, "cpu")
        t_params, t_head = _flat_params(t_params), _head_of(teacher)
    shapes = Shapes(s_shapes, t_shapes, num_classes=num_classes, num_examples=num_examples,
                    teacher_params=t_params, teacher_head=t_head)
    obj.check(shapes)
    obj.probe(shapes, cfg.data.batch_size)  # each term's output checked once, before the first write
    return Preflight(obj, student, params, buffers, shapes)


def _flat_params(params: dict) -> dict:
    """A teacher's params as one flat dict; an ensemble's ``{name: params}`` as ``"<name>:<param>"``."""
    if all(isinstance(v, dict) for v in params.values()) and params:
        return {f"{name}{SEP}{k}": v for name, p in params.items() for k, v in p.items()}
    return dict(params)


def _head_of(model) -> str:
    """The dotted name of a teacher's classifier head (its last ``nn.Linear``), or "" (an ensemble)."""
    template = getattr(model, "eval_template", None)
    if template is None:
        return ""
    try:
        return head_prefix(template)
    except ConfigError:
        return ""


def with_teacher(shapes: Shapes, teacher: "Teacher | None") -> Shapes:
    """``shapes`` with the loaded teacher's parameters, from which terms derive their constants at ``init``
    (OFD's margins, SRRL's copy of the head); unchanged without a teacher checkpoint (a mean teacher)."""
    if teacher is None or teacher.variables is None or not shapes.teacher_params:
        return shapes
    return attrs.evolve(shapes, teacher_params=_flat_params(teacher.variables["params"]),
                        teacher_head=_head_of(teacher.model))


def member_seed(seed: int, k: int) -> int:
    """Cohort member k's initialisation seed: member 0 keeps the run's seed, the others their own (64-bit)."""
    return seed if k == 0 else (seed * 1_000_003 + k) % 2**63


def member_config(cfg: Config, name: str) -> Config:
    """Cohort member ``name`` as a one-student config: its architecture and seed, no cohort (what its saved
    checkpoint says it is, for ``fkd evaluate`` and ``fkd export``)."""
    names = cfg.cohort.names
    model = cfg.cohort.members.get(name, cfg.student)
    return attrs.evolve(cfg, student=model, seed=member_seed(cfg.seed, names.index(name)), cohort=CohortConfig())


def member_checkpoint(cfg: Config, cohort: Cohort, state: dict, name: str) -> dict:
    """Cohort member ``name`` of a trained cohort state as a one-student checkpoint payload (``student_run``),
    which ``fkd evaluate`` and ``fkd export`` read like any student's: its weights, architecture and
    :func:`member_config`. Tensors are detached copies on the CPU."""
    weights = {"params": {"model": state["params"]["model"][name]}, "frozen": {}, "buffers": state["buffers"][name]}
    return {"state": tree_map(lambda t: t.detach().cpu(), weights),
            "model": dict(cohort.member(name).spec), "config": dumps(member_config(cfg, name)),
            "epoch": cfg.train.epochs, "batch": 0}


def build_students(cfg: Config, num_classes: int, feature_names=(), *, device="cpu", echo=None):
    """:func:`fkd.models.from_config.build_student`, or for a cohort (``[cohort]``) a
    :class:`~fkd.models.cohort.Cohort` of its members, each from its own seed (:func:`member_seed`), with
    ``{member: params}`` / ``{member: buffers}``."""
    names = cfg.cohort.names
    if not names:
        return build_student(cfg, num_classes, feature_names, device=device, echo=echo)
    built = {n: build_student(member_config(cfg, n), num_classes, feature_names, device=device, echo=echo if k == 0 else None)
             for k, n in enumerate(names)}
    models = tuple(b[0] for b in built.values())
    same = len({repr(sorted(m.spec.items())) for m in models}) == 1
    strategy = cfg.cohort.strategy
    if strategy == "vmap" and not same:
        raise ConfigError("cohort.strategy = 'vmap' needs members of one architecture; these differ. Use 'loop' "
                          "or 'auto'.")
    vmapped = strategy == "vmap" or (strategy == "auto" and same and torch.device(device).type == "cuda")
    return (Cohort(names, models, vmapped), {n: b[1] for n, b in built.items()}, {n: b[2] for n, b in built.items()})


def build_teachers(cfg: Config, num_classes: int, feature_names=(), device="cpu"):
    """:func:`fkd.models.from_config.build_teacher` for one teacher, or a :class:`TeacherEnsemble` of
    ``[teachers.<name>]`` with ``{name: params}`` / ``{name: buffers}`` (random weights)."""
    members = member_configs(cfg)
    if not members:
        return build_teacher(cfg, num_classes, feature_names, device=device)
    wanted = split_features(feature_names)
    built = {name: build_teacher(c, num_classes, wanted.get(name, ()), device=device) for name, c in members.items()}
    return (TeacherEnsemble(tuple(built), tuple(b[0] for b in built.values())),
            {n: b[1] for n, b in built.items()}, {n: b[2] for n, b in built.items()})


@attrs.frozen(eq=False)
class Teacher:
    """A loaded teacher: its template, ``{"params", "buffers"}``, checkpoint path and recorded test accuracy.

    Several teachers (``[teachers.<name>]``) are one :class:`Teacher` whose model is a
    :class:`~fkd.models.ensemble.TeacherEnsemble`, whose variables are keyed by teacher, and whose
    ``members`` are the teachers one by one (``path`` and ``accuracy`` are then None).
    """

    model: object
    variables: dict | None
    path: Path | None
    accuracy: float | None
    members: dict = attrs.field(factory=dict)  # {name: Teacher} of an ensemble


def load_teacher_for(cfg: Config, data, objective: Objective, device, *, echo: Callable = print,
                     quiet: bool = False) -> Teacher:
    """The teacher the objective consumes, fitted first when missing and ``teacher.fit_if_missing``.

    A mean teacher (``teacher.source = "ema"``) has no checkpoint: its template is the student's
    architecture and its variables live in the train state (``variables`` and ``path`` are None).
    """
    if ema_decay(cfg) is not None:
        model, _, _ = build_teacher(cfg, data.num_classes, objective.teacher_feature_names, device=device)
        return Teacher(model, None, None, None)
    if cfg.teachers:
        wanted = split_features(objective.teacher_feature_names)
        members = {name: _load_one(c, data, wanted.get(name, ()), device, echo=echo, quiet=quiet,
                                   label=f"{name} ({c.teacher.arch})")
                   for name, c in member_configs(cfg).items()}
        ensemble = TeacherEnsemble(tuple(members), tuple(t.model for t in members.values()))
        variables = {part: {n: t.variables[part] for n, t in members.items()} for part in ("params", "buffers")}
        return Teacher(ensemble, variables, None, None, members)
    return _load_one(cfg, data, objective.teacher_feature_names, device, echo=echo, quiet=quiet,
                     label=cfg.teacher.arch)


def _load_one(cfg: Config, data, feature_names, device, *, echo: Callable, quiet: bool, label: str) -> Teacher:
    """``cfg``'s one teacher, fitted first when missing and allowed, then loaded; says so as ``label``."""
    present = distributed.world().from_main(teacher_checkpoint_path(cfg).is_file)
    path = ensure_teacher(cfg, data, device, echo=echo, quiet=quiet)
    model, variables, accuracy = load_teacher(path, cfg, data.num_classes, feature_names, device)
    if weights_as_teacher(cfg) is not None:  # a state dict records no accuracy: measured here, once
        accuracy = evaluate_model(model, variables["params"], variables["buffers"], data.test, device=device,
                                  batch_size=cfg.data.eval_batch_size, num_classes=data.num_classes)["accuracy"]
    if present:  # a teacher fitted here has just said its accuracy
        echo(announce.teacher_loaded(label, path, accuracy))
    return Teacher(model, variables, path, accuracy)


def teacher_cache(cfg: Config, data, teacher: Teacher, *, augment: bool, device, echo: Callable = print):
    """``(lookup, where)``: cached teacher outputs for the training split, ``lookup(idx) -> {...}`` merged
    into each batch, or ``(None, why not)`` when the teacher must run live (``teacher.cache = "off"``, a
    random training view, or function matching's mixed images)."""
    if teacher.variables is None:
        return None, "off (the teacher is the student's moving average)"
    if teacher.members:  # each teacher cached under its own key, the batches joined as the ensemble's
        parts = {name: teacher_cache(c, data, teacher.members[name], augment=augment, device=device, echo=echo)
                 for name, c in member_configs(cfg).items()}
        if any(lookup is None for lookup, _ in parts.values()):
            return None, next(where for lookup, where in parts.values() if lookup is None)
        return _joined_lookup({n: lookup for n, (lookup, _) in parts.items()}), \
            ", ".join(f"{n} {where}" for n, (_, where) in parts.items())
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


def _joined_lookup(lookups: dict) -> Callable:
    """The ensemble's batch entries from each teacher's cache: logits stacked to ``(B, M, K)``, features
    renamed ``"<teacher>:<feature>"``; when any teacher's cache holds logits only, no features at all (the
    step then runs the teachers live up to their last feature)."""

    def lookup(idx):
        parts = {name: fn(idx) for name, fn in lookups.items()}
        out = {"teacher_logits": torch.stack([p["teacher_logits"] for p in parts.values()], dim=1)}
        if all("teacher_features" in p for p in parts.values()):
            out["teacher_features"] = {f"{name}{SEP}{k}": v for name, p in parts.items()
                                       for k, v in p["teacher_features"].items()}
        return out

    return lookup
