"""The build layer: a config file in, a checked config and the objective it describes out, once per run.

Commands call :func:`load` (or :func:`load_config`); nothing below this layer reads a config file.
In order, it

1. reads the TOML file and applies ``--set`` overrides (:mod:`fkd.config`, which also expands a
   preset into ``[distill.terms]`` tables);
2. imports the user's files (``distill.imports``): they may register terms, models, optimizers,
   schedules or data sets;
3. resolves every name through its registry and checks each component's options against its
   builder's keyword parameters (:func:`fkd.registry.resolve_options`), filling in the builder's
   defaults, so the returned config is complete (``dumps`` writes every option);
4. runs the checks that span fields (mixing needs a teacher term, widths, milestones), and
5. builds the :class:`~fkd.objective.Objective` -- the one objective of the run.

Which registry a table chooses from, and the keys fkd passes a builder itself, are listed here
(:data:`CHOOSERS`); the options themselves live only in the builders' signatures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from fkd import objective as objective_lib
from fkd.config import (Config, DataConfig, DistillConfig, ModelConfig, OptimizerConfig, TeacherConfig,
                        apply_overrides, from_dict, meaning, read_toml, schema_rows)
from fkd.data.datasets import DATASETS
from fkd.data.transforms import augments
from fkd.errors import ConfigError
from fkd.log_sinks import check_available as check_logging
from fkd.mixup import check_mixing
from fkd.models import MODELS, model_builder
from fkd.models.timm_models import options_template as timm_options_template
from fkd.objective import Objective
from fkd.optim import OPTIMIZERS
from fkd.presets import METHODS
from fkd.registry import Registry, naming_options, option_default, option_help, options_of, resolve_options
from fkd.schedules import SCHEDULES, learning_rate_schedule
from fkd.schema import toml_value
from fkd.stage_config import refuse_pipeline_keys
from fkd.terms import TERMS, config_fields
from fkd.user_imports import import_user_files

__all__ = ["Resolved", "load", "load_config", "resolve", "augments", "help_text", "CHOOSERS"]

#: Model options fkd sets from fixed keys itself (``teacher.weights``), never from options.
MODEL_FIXED = ("weights",)


@attrs.frozen
class Resolved:
    """A run's checked, complete config and the objective built from it."""

    config: Config
    objective: Objective


def _name_field(cls: type) -> str:
    return {OptimizerConfig: "name", DataConfig: "name", ModelConfig: "arch", TeacherConfig: "arch"}[cls]


#: ``config class -> [(registry, field naming its entry)]``: where a table's options come from.
CHOOSERS: dict[type, list[tuple[Registry, str]]] = {
    OptimizerConfig: [(OPTIMIZERS, "name"), (SCHEDULES, "schedule")],
    DataConfig: [(DATASETS, "name")],
    ModelConfig: [(MODELS, "arch")],
    TeacherConfig: [(MODELS, "arch")],
}


def load(path: str | Path | None = None, overrides: list[str] = (), **top: Any) -> Resolved:
    """Read ``path`` (or start from the defaults), apply ``--set`` overrides and top-level values
    (``seed=``, ``device=``), then :func:`resolve`."""
    raw = read_toml(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides))
    refuse_pipeline_keys(raw)  # [[stages]] and teacher.from_stage: read by fkd.stages, never here
    for key, value in top.items():
        if value is not None:
            raw[key] = value
    return resolve(from_dict(raw))


def load_config(path: str | Path | None = None, overrides: list[str] = (), **top: Any) -> Config:
    """The checked, complete config of :func:`load` (its objective is built and dropped)."""
    return load(path, overrides, **top).config


def resolve(cfg: Config) -> Resolved:
    """Check ``cfg`` as a whole and build its objective (see the module docstring)."""
    d = cfg.distill
    for key, names in (("distill.student_features", d.student_features),
                       ("distill.teacher_features", d.teacher_features), ("distill.imports", d.imports)):
        if not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{key} must be a list of strings (got {names!r}).")
    if d.imports:  # first: the user's files may register terms, models, optimizers, schedules, data sets
        import_user_files(list(d.imports))
    cfg = attrs.evolve(
        cfg,
        data=_with_options(cfg.data, "data"),
        student=_with_options(cfg.student, "student"),
        teacher=attrs.evolve(_with_options(cfg.teacher, "teacher"),
                             train=_train(cfg.teacher.train, "teacher.train")),
        teachers={name: attrs.evolve(_with_options(t, f"teachers.{name}"), train=_train(t.train, f"teachers.{name}.train"))
                  for name, t in cfg.teachers.items()},
        train=_train(cfg.train, "train"),
        cohort=attrs.evolve(cfg.cohort, members={name: _with_options(m, f"cohort.members.{name}")
                                                 for name, m in cfg.cohort.members.items()}),
    )
    if cfg.cohort.members and cfg.cohort.size not in (0, len(cfg.cohort.members)):
        raise ConfigError(f"cohort.size = {cfg.cohort.size} but {len(cfg.cohort.members)} [cohort.members] tables are "
                          "given; drop cohort.size (the tables name the members) or make them agree.")
    if cfg.cohort.names and cfg.teacher.source == "ema":
        raise ConfigError("a moving-average teacher of a cohort is not supported; train the cohort with a "
                          "teacher checkpoint (teacher.source = 'checkpoint') or without a teacher.")
    if cfg.teachers and (cfg.teacher.source == "ema" or any(t.source == "ema" for t in cfg.teachers.values())):
        raise ConfigError("a moving-average teacher (source = 'ema') is one teacher, in [teacher]; remove the "
                          "[teachers.<name>] tables or set teacher.source = 'checkpoint'.")
    objective = objective_lib.over_cohort(objective_lib.from_config(d, teachers=cfg.teachers), cfg.cohort.names)
    check_mixing(cfg.data, objective)  # function matching: a teacher term, no label term
    check_logging(cfg.log)  # tensorboard / wandb installed when asked for (not imported)
    return Resolved(cfg, objective)


def objective_from(distill: DistillConfig, teachers: dict | None = None) -> Objective:
    """The objective of ``[distill]`` (its term tables; ``distill.weights`` in messages for ``combined``),
    over the ensemble of ``teachers`` (``[teachers.<name>]``) when there are several."""
    return objective_lib.from_config(distill, teachers=teachers or {})


def _train(train, key: str):
    milestones = train.optimizer.options.get("milestones", [])  # before its schedule is asked about it
    if not isinstance(milestones, list) or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in milestones):
        raise ConfigError(f"{key}.optimizer.milestones must be a list of positive epoch numbers (got {milestones!r}).")
    opt = _with_options(train.optimizer, f"{key}.optimizer")
    entry = OPTIMIZERS.get(opt.name)
    mine = {k: v for k, v in opt.options.items() if k in options_of(entry)}
    with naming_options(f"{key}.optimizer", mine):
        entry(opt.learning_rate, **mine)  # its own checks
    # the schedule's own checks too, at a nominal 1000 steps per epoch (the run checks its real count again)
    learning_rate_schedule(opt, 1000, train.epochs, key=f"{key}.optimizer")
    return attrs.evolve(train, optimizer=opt)


def _with_options(table, key: str):
    """``table`` with its options checked against the builders it chooses and completed with their defaults."""
    cls = type(table)
    fixed = tuple(f for f in attrs.fields_dict(cls) if f != "options")
    exclude = MODEL_FIXED if cls in (ModelConfig, TeacherConfig) else ()
    chosen = []
    for registry, field in CHOOSERS[cls]:
        name = getattr(table, field)
        if registry is MODELS:  # torchvision names are models too (options: none but teacher.weights)
            chosen.append((registry, name, model_builder(name, key=f"{key}.{field}")))
        else:
            chosen.append((registry, name))
    widths = table.options.get("widths")
    if "widths" in table.options and (not isinstance(widths, list) or not widths or not all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)):
        raise ConfigError(f"{key}.widths must be a non-empty list of positive integers (got {widths!r}).")
    # Today's rule, kept: an optimizer or schedule refuses another one's key unless it holds its default;
    # a data set or model ignores another's (configs switch data sets and models with --set).
    options = resolve_options(table.options, chosen, prefix=key, fixed=fixed, exclude=exclude,
                              strict=cls is OptimizerConfig)
    return attrs.evolve(table, options=options)


# --- fkd config --keys ---------------------------------------------------------------------------------


def help_text() -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every key: the schema's fixed keys with the names their registries
    hold, every registered component's options (help from its builder's ``Args:`` line), and the keys of
    every registered loss term."""
    registries = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "data set": DATASETS, "model": MODELS,
                  "distillation method": METHODS}
    return [*schema_rows(names=lambda kind: registries[kind].names(), after=_option_rows), *_term_rows()]


def _option_rows(key: str, table: Any, field: attrs.Attribute) -> list[tuple[str, str, str]]:
    """After a field that chooses an entry (``train.optimizer.name``): one row per option any entry of
    that registry takes, the default from the table's own options or the first builder taking it."""
    registry = next((r for r, f in CHOOSERS.get(type(table), ()) if f == field.name), None)
    if registry is None:
        return []
    exclude = MODEL_FIXED if type(table) in (ModelConfig, TeacherConfig) else ()
    table_key = key.rpartition(".")[0]
    rows = []
    for option in registry.option_keys(exclude=exclude):
        takers = [n for n in registry.names() if option in options_of(registry.get(n), exclude=exclude)]
        first = options_of(registry.get(takers[0]), exclude=exclude)[option]
        default = table.options.get(option, option_default(first))
        shown = "(required)" if default is first.empty else toml_value(default)
        text = next((h for n in takers if (h := option_help(registry.get(n), option))), "")
        rows.append((f"{table_key}.{option}", shown, f"{text or option} ({registry.kind} option of {', '.join(takers)})"))
    if registry is MODELS:  # a timm:<name> model's keys (fkd.models.timm_models), whether timm is installed or not
        for option, param in options_of(timm_options_template, exclude=exclude).items():
            text = option_help(timm_options_template, option).removeprefix("timm: ")
            rows.append((f"{table_key}.{option}", toml_value(option_default(param)),
                         f"{text} (model option of timm:<name>)"))
    return rows


def _term_rows() -> list[tuple[str, str, str]]:
    """``distill.terms.<name>.<key>`` rows for every registered loss term."""
    rows = []
    for name in TERMS.names():
        cls = TERMS.get(name)
        rows.append((f"distill.terms.{name}.weight", "1.0", f"weight of the '{name}' term: {cls.summary}"))
        rows.append((f"distill.terms.{name}.weight_schedule", "{}",
                     "the weight as a function of the fractional epoch: {kind = \"warmup\" | \"until\" | \"after\" | "
                     "\"linear\" | \"cosine\", epochs = E, start, end} (linear / cosine: start and end factors); "
                     "empty: constant"))
        if "pairs" in attrs.fields_dict(cls):
            for side in ("student", "teacher"):
                rows.append((f"distill.terms.{name}.{side}_features", "[]",
                             f"this term's own {side} features (paired by position), overriding "
                             f"distill.{side}_features for it alone"))
        if {"teacher_logits", "teacher_features"} & cls.consumes:
            reads = ("the ensemble (at its temperature) unless it names one" if cls.ensemble_temperature
                     else "one teacher: with several it must name one (it cannot read an ensemble)")
            rows.append((f"distill.terms.{name}.teacher", '""', f"with [teachers.<name>]: the teacher it reads; it "
                                                               f"reads {reads}"))
        for f in config_fields(cls):
            rows.append((f"distill.terms.{name}.{f.name}", toml_value(f.default), meaning(f)))
    return rows
