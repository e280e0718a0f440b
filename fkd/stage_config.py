"""Pipeline configs: a file with ``[[stages]]`` is a chain of runs, each a config fragment over a shared base.

::

    name = "teacher-assistant"      # the pipeline: its stages run in runs/<name>/<stage>/ unless --out
    [data] ...                      # the top level (minus stages) is every stage's base
    [[stages]]
    name = "assistant"              # a plain name, unique: the stage's run directory
    kind = "distill"                # "teacher" (fit a teacher, as `fkd teacher`) or "distill" (as `fkd distill`)
    student = { arch = "small_cnn", widths = [64, 128] }
    [[stages]]
    name = "student"
    kind = "distill"
    teacher = { from_stage = "assistant" }   # the teacher is that earlier stage's model

Each stage's tables merge deeply over the base, as ``extends`` merges a file over its bases
(:func:`fkd.config_files.merge_tables`). ``teacher.from_stage`` names an earlier stage: its fitted
teacher (a ``teacher`` stage) or its trained student (a ``distill`` stage) is this stage's teacher, and
the pipeline runner (:mod:`fkd.stages`) fills in ``teacher.arch``, its options and ``teacher.checkpoint``
from it, so a stage that names ``from_stage`` sets none of those. A stage can learn only from one before
it, so a pipeline has no cycles: naming itself or a later stage is refused, like an unknown name.

This module reads dicts and checks their shape only; it knows no model or registry, and sits beside
:mod:`fkd.config` (which it imports for the name rule) below the build layer.
"""

from __future__ import annotations

import copy
import difflib

import attrs

from fkd.config import TeacherConfig, plain_name
from fkd.config_files import merge_tables
from fkd.errors import ConfigError

STAGES = "stages"
FROM_STAGE = "from_stage"
KINDS = ("teacher", "distill")
#: What ``teacher.from_stage`` fills in itself: a stage naming it may not set these.
FILLED_BY_FROM_STAGE = ("arch", "checkpoint", "fit_if_missing", "source")


@attrs.frozen
class StageSpec:
    """One stage as written: ``table`` is its whole config (the base with the stage's own tables merged
    over it, ``name``, ``kind`` and ``teacher.from_stage`` taken out), ``from_stage`` the stage it learns
    from (None: its teacher is ``[teacher]`` as in any config)."""

    name: str
    kind: str
    table: dict
    from_stage: str | None = None
    #: ``{teacher: stage}`` from ``[teachers.<teacher>] from_stage = "<stage>"``: an ensemble of earlier stages
    teachers_from: dict = attrs.field(factory=dict)


@attrs.frozen
class PipelineSpec:
    """A pipeline as written: its name (the folder ``runs/<name>``) and its stages in order."""

    name: str
    stages: tuple[StageSpec, ...]

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)


def is_pipeline(raw: dict) -> bool:
    """Whether a config table (a file with its ``extends`` resolved) is a pipeline (has ``[[stages]]``)."""
    return STAGES in raw


def refuse_pipeline_keys(raw: dict) -> None:
    """A single-run config may not hold ``[[stages]]`` or ``teacher.from_stage``: one ConfigError saying
    where they belong. Commands that run one config (``teacher``, ``sweep``, ``config``) call it through
    :func:`fkd.build.load`."""
    if is_pipeline(raw):
        raise ConfigError("this config is a pipeline ([[stages]]); run it with `fkd distill --config FILE` (or over "
                          "seeds with `fkd sweep --config FILE --seeds N`); the other commands take one stage: its "
                          "run directory, or the config.toml written there.")
    teacher = raw.get("teacher")
    teachers = raw.get("teachers")
    if isinstance(teachers, dict) and any(isinstance(t, dict) and FROM_STAGE in t for t in teachers.values()):
        teacher = {FROM_STAGE: None}
    if isinstance(teacher, dict) and FROM_STAGE in teacher:
        raise ConfigError("teacher.from_stage names an earlier stage of a pipeline ([[stages]]); a single-run "
                          "config has none: set teacher.checkpoint to the teacher's file instead.")


def parse_pipeline(raw: dict) -> PipelineSpec:
    """Check a pipeline's shape and merge each stage over the base; a ConfigError naming the stage otherwise.

    Refused: ``stages`` that is not a non-empty list of tables; a stage without a plain, unique ``name``
    or with a ``kind`` other than teacher / distill; ``teacher.from_stage`` that is not a string naming
    an earlier distill or teacher stage (an unknown name, the stage itself, a later stage), set in the
    base, on a teacher stage, or beside the keys it fills in (``teacher.arch``, ``teacher.checkpoint``,
    ``teacher.fit_if_missing`` or a model option in the stage's own table).
    """
    stages = raw[STAGES]
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise ConfigError("stages must be a non-empty array of tables: write each stage as [[stages]] with its "
                          "name and kind (see docs/paradigms.md).")
    base = {k: v for k, v in raw.items() if k != STAGES}
    name = base.get("name", "fkd")
    _check_plain("name", name, "the pipeline's runs/<name> folder")
    if isinstance(base.get("teacher"), dict) and FROM_STAGE in base["teacher"]:
        raise ConfigError("teacher.from_stage is set at the top of the pipeline, where every stage would read it; "
                          "set it in the [[stages]] table that learns from that stage.")
    names = [s.get("name") for s in stages]
    specs = []
    for i, own in enumerate(stages):
        specs.append(_stage(own, i, names, base))
    return PipelineSpec(name, tuple(specs))


def _stage(own: dict, index: int, names: list, base: dict) -> StageSpec:
    name = own.get("name")
    if name is None:
        raise ConfigError(f"stage {index + 1} has no name; give each [[stages]] table a name = \"...\" (its run "
                          "directory).")
    _check_plain(f"stage {index + 1}'s name", name, "its run directory")
    if names.index(name) != index:
        raise ConfigError(f"two stages are named '{name}'; stage names must be unique (each is a run directory).")
    where = f"stage '{name}'"
    kind = own.get("kind")
    if kind not in KINDS:
        shown = "no kind" if kind is None else f"kind = {kind!r}"
        raise ConfigError(f"{where} has {shown}; set kind = \"teacher\" (fit a teacher) or \"distill\" (train a "
                          "student).")
    tables = copy.deepcopy({k: v for k, v in own.items() if k not in ("name", "kind")})
    if "extends" in tables:
        raise ConfigError(f"{where} sets extends; a stage extends the pipeline's top level only: put extends at "
                          "the top of the file.")
    teacher = tables.get("teacher")
    source = teacher.pop(FROM_STAGE, None) if isinstance(teacher, dict) else None
    if source is not None:
        _check_source(where, name, kind, source, names, teacher)
    teachers_from = {}
    for teacher_name, table in (tables.get("teachers") or {}).items():  # an ensemble of earlier stages' models
        if isinstance(table, dict) and FROM_STAGE in table:
            teachers_from[teacher_name] = table.pop(FROM_STAGE)
            _check_source(f"{where} (teachers.{teacher_name})", name, kind, teachers_from[teacher_name], names, table)
    return StageSpec(name, kind, merge_tables(base, tables), source, teachers_from)


def _check_source(where: str, name: str, kind: str, source, names: list, teacher: dict) -> None:
    """``teacher.from_stage = source`` of stage ``name`` names an earlier stage and stands alone."""
    if kind == "teacher":
        raise ConfigError(f"{where} is a teacher stage, which fits its teacher from the data; teacher.from_stage "
                          "belongs to a distill stage (make this stage kind = \"distill\").")
    if not isinstance(source, str):
        raise ConfigError(f"{where}: teacher.from_stage must be a stage name (a string), not {source!r}.")
    if source == name:
        raise ConfigError(f"{where} names itself in teacher.from_stage; a stage learns from an earlier stage.")
    if source not in names:
        close = difflib.get_close_matches(source, [n for n in names if n != name], n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"the stages are {', '.join(map(str, names))}."
        raise ConfigError(f"{where}: teacher.from_stage = '{source}' is not a stage of this pipeline; {hint}")
    if names.index(source) > names.index(name):
        raise ConfigError(f"{where}: teacher.from_stage = '{source}' names a later stage; stages run in order, so "
                          f"a stage learns only from one before it: move '{source}' above '{name}'.")
    fixed = {f.name for f in attrs.fields(TeacherConfig)}
    clash = [k for k in teacher if k in FILLED_BY_FROM_STAGE or k not in fixed]
    if clash:
        raise ConfigError(f"{where} sets teacher.{clash[0]} beside teacher.from_stage, which takes the teacher's "
                          f"architecture and checkpoint from stage '{source}'; remove teacher.{clash[0]}.")


def _check_plain(key: str, value, what: str) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string (got {value!r}); it names {what}.")
    try:
        plain_name(None, None, value)
    except ValueError as exc:
        raise ConfigError(f"{key} {exc}.") from None
