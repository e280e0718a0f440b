"""``fkd distill`` on a pipeline: stages run in order, each in its own run directory, each stage's teacher
possibly an earlier stage's model (teacher-assistant chains, Mirzadeh et al. AAAI 2020; born-again
generations, Furlanello et al. ICML 2018). The file format is :mod:`fkd.stage_config`'s.

::

    runs/<pipeline name>/           (or --out DIR)
        <stage>/                    one run directory per stage, as `fkd teacher` / `fkd distill` write it;
            as_teacher.pt           a distill stage's student as a teacher checkpoint (what later stages load)
        pipeline.json               each stage: kind, run directory, model, test accuracy, its teacher

1. :func:`plan_pipeline` reads the file, checks its stages and builds every stage's config with the build
   layer (:func:`fkd.build.resolve`), a ``teacher.from_stage`` teacher filled in from the stage it names;
   then it checks every stage's run directory -- finished with the same config: skipped; started with the
   same config: resumed, bit-exactly, from its checkpoint; anything else refused -- and every teacher
   that must already exist. It only reads: a refused pipeline writes nothing, not even for its first stage.
2. :func:`run_pipeline` runs each stage that is not finished, as the ``teacher`` or ``distill`` command
   would (:func:`fkd.teacher.fit_teacher`, :func:`fkd.distill.run_distill`), writes ``pipeline.json``
   and returns the stages' rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import attrs
import torch

from fkd import distributed
from fkd.build import resolve
from fkd.config import Config, TeacherConfig, apply_overrides, dumps, from_dict, read_toml
from fkd.data import load_data
from fkd.device import resolve_device
from fkd.distill import run_distill
from fkd.distill_setup import ema_decay, member_configs, teacher_to_use
from fkd.errors import CheckpointError, ConfigError
from fkd.objective import Objective
from fkd.rundir import RunDir, write_text_atomic
from fkd.run_start import config_key
from fkd.runlock import RunLock
from fkd.stage_config import FILLED_BY_FROM_STAGE, STAGES, PipelineSpec, is_pipeline, parse_pipeline
from fkd.sweep.stats import describe, format_table
from fkd.teacher import fit_teacher, save_student_as_teacher, teacher_checkpoint_path

AS_TEACHER = "as_teacher.pt"
PIPELINE_JSON = "pipeline.json"
PIPELINE_SWEEP_JSON = "pipeline_sweep.json"


@attrs.frozen(eq=False)
class Stage:
    """One planned stage: its checked config and objective, its run directory, the stage it learns from,
    and ``status``: ``"fresh"``, ``"resume"`` (its run directory holds a checkpoint of this config) or
    ``"finished"`` (a summary, written with this very config)."""

    name: str
    kind: str
    config: Config
    objective: Objective
    run: RunDir
    from_stage: str | None
    status: str
    teachers_from: dict = attrs.field(factory=dict)  # {teacher: stage} of an ensemble of earlier stages

    @property
    def sources(self) -> list[str]:
        """The stages this one learns from: ``teacher.from_stage`` and each ``teachers.<name>.from_stage``."""
        return ([self.from_stage] if self.from_stage else []) + list(self.teachers_from.values())

    @property
    def arch(self) -> str:
        """The model this stage trains."""
        return self.config.teacher.arch if self.kind == "teacher" else self.config.student.arch

    @property
    def model_options(self) -> dict:
        return dict(self.config.teacher.options if self.kind == "teacher" else self.config.student.options)

    @property
    def teacher_file(self) -> Path:
        """The teacher checkpoint a later stage loads: a teacher stage's fitted teacher, a distill stage's
        student written as a teacher (:data:`AS_TEACHER`)."""
        if self.kind == "teacher":
            return teacher_checkpoint_path(self.config, self.run)
        return self.run.path / AS_TEACHER

    @property
    def needs_teacher(self) -> bool:
        return self.kind == "distill" and self.objective.needs_teacher


@attrs.frozen(eq=False)
class Pipeline:
    """A planned pipeline: its name, its folder and its stages in order."""

    name: str
    root: Path
    stages: tuple[Stage, ...]


def is_pipeline_file(path: str | Path | None) -> bool:
    """Whether ``path`` is a pipeline config (``[[stages]]``); False for no file (the command's own load
    then says what is wrong with it)."""
    return path is not None and Path(path).is_file() and is_pipeline(read_toml(path))


def plan_pipeline(path: str | Path, overrides: list[str] = (), *, out: str | Path | None = None,
                  seed: int | None = None, device: str | None = None) -> Pipeline:
    """Read and check the pipeline at ``path``; every refusal is a ConfigError / CheckpointError, before
    anything is written.

    ``overrides`` (``--set key=value``) apply to every stage, over its own tables; ``seed`` / ``device``
    likewise. The stages run in ``out`` (default ``runs/<name>``), each in ``<out>/<stage>``; a stage's
    run name is ``<name>-<stage>``.
    """
    overrides = list(overrides)
    spec = read_pipeline(path, overrides)
    root = Path(out) if out is not None else Path("runs") / spec.name
    stages: dict[str, Stage] = {}
    for s in spec.stages:
        table = apply_overrides(s.table, overrides)  # --set wins over the stage's own tables too
        table["name"] = f"{spec.name}-{s.name}"
        table.update({k: v for k, v in (("seed", seed), ("device", device)) if v is not None})
        if s.from_stage is not None:
            table["teacher"] = _teacher_table(stages[s.from_stage], table.get("teacher", {}))
        for teacher_name, source in s.teachers_from.items():
            table["teachers"][teacher_name] = _teacher_table(stages[source], table["teachers"][teacher_name])
        try:
            resolved = resolve(from_dict(table))
        except ConfigError as exc:
            raise ConfigError(f"stage '{s.name}': {exc}") from None
        run = RunDir(root / s.name)
        status = _status(s.name, run, dumps(resolved.config))
        stages[s.name] = Stage(s.name, s.kind, resolved.config, resolved.objective, run, s.from_stage, status,
                               s.teachers_from)
    pipeline = Pipeline(spec.name, root, tuple(stages.values()))
    _check_teachers(pipeline)
    return pipeline


def read_pipeline(path: str | Path, overrides: list[str] = ()) -> PipelineSpec:
    """The stages of the pipeline at ``path`` as written, with ``--set`` overrides applied to its top level
    (its name among them); checked for shape only (:func:`fkd.stage_config.parse_pipeline`)."""
    raw = read_toml(path)
    base = apply_overrides({k: v for k, v in raw.items() if k != STAGES}, list(overrides))
    return parse_pipeline({**base, STAGES: raw[STAGES]})


def _teacher_table(source: Stage, own: dict) -> dict:
    """The ``[teacher]`` of a stage learning from ``source``: its own keys that do not name a model, then the
    architecture, model options and checkpoint of ``source``'s model; never fitted here."""
    kept = {k: v for k, v in own.items()
            if k in attrs.fields_dict(TeacherConfig) and k not in (*FILLED_BY_FROM_STAGE, "options")}
    return {**kept, **source.model_options, "arch": source.arch, "checkpoint": source.teacher_file.as_posix(),
            "fit_if_missing": False, "source": "checkpoint"}


def _status(name: str, run: RunDir, config_text: str) -> str:
    """Whether stage ``name`` starts fresh, resumes or is finished in ``run``; refused when ``run`` holds a
    run of another config (reads only)."""
    saved = run.config_path.read_text(encoding="utf-8") if run.config_path.is_file() else None
    if run.summary_path.is_file():
        if saved != config_text:
            raise ConfigError(f"stage '{name}' finished in '{run.path}' with another config; delete that folder "
                              "to run the stage again with this one, or start a new pipeline with --out.")
        return "finished"
    if run.latest.is_file():
        if saved is not None and config_key(saved) != config_key(config_text):
            raise CheckpointError(f"the run of stage '{name}' in '{run.path}' was started with a different config; "
                                  f"resume it with its own config ({run.config_path}) or start a new pipeline "
                                  "with --out.")
        return "resume"
    return "fresh"


def _check_teachers(pipeline: Pipeline) -> None:
    """Every teacher a stage loads exists when it runs: written by an earlier stage, on disk, or fitted on the
    way (``teacher.fit_if_missing``); a finished stage learned from a stage that is finished too."""
    planned: set[Path] = set()  # teacher files earlier stages write
    by_name = {s.name: s for s in pipeline.stages}
    for stage in pipeline.stages:
        where = f"stage '{stage.name}'"
        for source in (by_name[name] for name in stage.sources):
            _check_source_stage(stage, source, where)
        if stage.kind == "teacher":
            path = stage.teacher_file
            if stage.status == "fresh" and path.exists():
                raise CheckpointError(f"{where} would fit the teacher into '{path}', which already exists; set "
                                      "teacher.checkpoint to a new file, or use the existing one in a distill "
                                      "stage's teacher.checkpoint (no teacher stage).")
            planned.add(path.resolve())
            continue
        planned.add(stage.teacher_file.resolve())  # as_teacher.pt, for a later stage's from_stage
        if stage.status == "finished" or not stage.needs_teacher:
            continue
        if ema_decay(stage.config) is not None:
            continue  # a mean teacher: the student's own average, no checkpoint
        for cfg in (member_configs(stage.config) or {"": stage.config}).values():  # one teacher, or each of several
            try:
                path = teacher_checkpoint_path(cfg)
                if path.resolve() in planned:
                    continue  # a teacher stage above fits it
                teacher_to_use(cfg)
            except (CheckpointError, ConfigError) as exc:
                raise type(exc)(f"{where}: {exc}") from None
            if not path.is_file() and path.parent.resolve() == stage.run.path.resolve():
                raise ConfigError(f"{where}: teacher.checkpoint '{path}' is in the stage's run directory, where the "
                                  "missing teacher would be fitted too; set it to a file in another folder.")


def _check_source_stage(stage: Stage, source: Stage, where: str) -> None:
    """``stage`` may learn from ``source``: it has a teacher term, and its finished run was made from
    ``source``'s finished model, which is still there."""
    if not stage.needs_teacher:
        raise ConfigError(f"{where} learns from stage '{source.name}' (from_stage), but its loss has no "
                          "teacher term; add one (e.g. distill.method = \"logit\") or drop from_stage.")
    if stage.status == "finished" and source.status != "finished":
        raise ConfigError(f"{where} is finished in '{stage.run.path}', but the stage it learned from, "
                          f"'{source.name}', is not: its new model would not be this stage's teacher; delete "
                          f"'{stage.run.path}' to run the stage again.")
    if source.status == "finished" and not _can_give_teacher(source):
        raise CheckpointError(f"stage '{source.name}' is finished in '{source.run.path}', but its model "
                              f"({source.teacher_file}) is gone; delete that folder to run the stage again.")


def _can_give_teacher(stage: Stage) -> bool:
    if stage.teacher_file.is_file():
        return True
    return stage.kind == "distill" and stage.run.latest.is_file()  # as_teacher.pt is written from it


def run_pipeline(pipeline: Pipeline, device: torch.device, *, quiet: bool = False,
                 echo: Callable[[str], None] = print) -> dict:
    """Run the stages of ``pipeline`` that are not finished, in order, on ``device``; write ``pipeline.json``
    and return it (``{"name", "stages": [row, ...]}``, a row per stage: :func:`stage_row`)."""
    world = distributed.world()
    rows = []
    n = len(pipeline.stages)
    with distributed.on_main(lambda: RunLock(pipeline.root)):
        for i, stage in enumerate(pipeline.stages, 1):
            head = f"stage {i}/{n} '{stage.name}' ({stage.kind}, {stage.arch}) in {stage.run.path}"
            if stage.status == "finished":
                echo(f"{head}: finished, skipped")
                summary = json.loads(stage.run.summary_path.read_text())
            else:
                echo(f"{head}: {'resuming from its checkpoint' if stage.status == 'resume' else 'starting'}")
                summary = _run_stage(stage, device, quiet=quiet, echo=echo)
            as_teacher = stage.run.path / AS_TEACHER
            if stage.kind == "distill" and world.is_main and (stage.status != "finished" or not as_teacher.is_file()):
                save_student_as_teacher(stage.run, as_teacher)
            world.barrier()  # under torchrun: written before any rank loads it as the next stage's teacher
            rows.append(stage_row(stage, summary))
        result = {"name": pipeline.name, "stages": rows}
        if world.is_main:
            write_text_atomic(pipeline.root / PIPELINE_JSON, json.dumps(result, indent=2) + "\n")
    echo(format_pipeline_table(rows))
    return result


def _run_stage(stage: Stage, device: torch.device, *, quiet: bool, echo: Callable[[str], None]) -> dict:
    resume = stage.status == "resume"
    if stage.kind == "teacher":
        data = load_data(stage.config.data, device=device)
        return fit_teacher(stage.config, data, device, stage.run, resume=resume, quiet=quiet, echo=echo)
    return run_distill(stage.config, stage.run, device, resume=resume, quiet=quiet, echo=echo,
                       objective=stage.objective)


def stage_row(stage: Stage, summary: dict) -> dict:
    """A stage's entry in ``pipeline.json``: what it trained, where, its test accuracy and its teacher."""
    row = {"stage": stage.name, "kind": stage.kind, "run_dir": str(stage.run.path), "model": stage.arch,
           "test_acc": summary["teacher_test_acc" if stage.kind == "teacher" else "student_test_acc"],
           "skipped": stage.status == "finished", "teacher": None}
    if stage.kind == "teacher":
        row["checkpoint"] = str(stage.teacher_file)
    else:
        row["checkpoint"] = str(stage.run.path / AS_TEACHER)
        if "teacher_test_acc" in summary:
            row["teacher"] = {"stage": ", ".join(stage.sources) or None, "model": summary["teacher_arch"],
                              "checkpoint": summary.get("teacher_checkpoint"), "test_acc": summary["teacher_test_acc"]}
    return row


def format_pipeline_table(rows: list[dict]) -> str:
    """The stages as a small table: stage, kind, model, its teacher, test accuracy."""
    lines = [("stage", "kind", "model", "teacher", "test acc")]
    for r in rows:
        t = r["teacher"]
        teacher = "-" if t is None else (f"stage {t['stage']}" if t["stage"] else t["model"])
        lines.append((r["stage"], r["kind"], r["model"], teacher, f"{r['test_acc']:.2%}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
            for line in lines]
    text.insert(1, "-" * max(len(t) for t in text))
    return "\n".join(text)


def run_pipeline_file(path: str | Path, overrides: list[str] = (), *, out: str | Path | None = None,
                      seed: int | None = None, device: str | None = None, quiet: bool = False,
                      echo: Callable[[str], None] = print) -> dict:
    """``fkd distill --config PIPELINE``: :func:`plan_pipeline`, then :func:`run_pipeline` on the device the
    first stage's config names (under torchrun, this process's)."""
    from fkd.device import resolve_device

    pipeline = plan_pipeline(path, overrides, out=out, seed=seed, device=device)
    dev = distributed.init_from_env(resolve_device(pipeline.stages[0].config.device))
    echo = distributed.echo_main(echo)
    echo(f"# pipeline {pipeline.name} ({path}): {len(pipeline.stages)} stages "
         f"({', '.join(s.name for s in pipeline.stages)}); device {dev}; directory {pipeline.root}")
    return run_pipeline(pipeline, dev, quiet=quiet, echo=echo)


def run_pipeline_seeds(path: str | Path, overrides: list[str], seeds: tuple[int, ...], *,
                       out: str | Path | None = None, device: str | None = None, quiet: bool = False,
                       echo: Callable[[str], None] = print) -> dict:
    """``fkd sweep --config PIPELINE --seeds ...``: the whole pipeline once per seed, in ``<out>/seed-<s>/``
    (default ``runs/<name>-sweep``), then each stage's test accuracy over the seeds (mean, sample std,
    Student-t 95% interval, :mod:`fkd.sweep.stats`), the first stage without a teacher as the baseline.

    Every seed's stages are planned and checked before the first runs; running it again skips finished
    stages and resumes an interrupted one, seed by seed. Writes ``<out>/pipeline_sweep.json``.
    """
    name = read_pipeline(path, overrides).name
    root = Path(out) if out is not None else Path("runs") / f"{name}-sweep"
    plans = [plan_pipeline(path, overrides, out=root / f"seed-{s}", seed=s, device=device) for s in seeds]
    dev = distributed.init_from_env(resolve_device(plans[0].stages[0].config.device))
    echo = distributed.echo_main(echo)
    echo(f"# pipeline {name} ({path}) over seeds {', '.join(map(str, seeds))}: {len(plans[0].stages)} stages "
         f"each; device {dev}; directory {root}")
    results = []
    for seed, plan in zip(seeds, plans):
        echo(f"## seed {seed}")
        results.append(run_pipeline(plan, dev, quiet=quiet, echo=echo))
    stages = plans[0].stages
    baseline = next((s.name for s in stages if s.kind == "distill" and not s.needs_teacher), None)
    rows = []
    for i, stage in enumerate(stages):
        accs = [r["stages"][i]["test_acc"] for r in results]
        rows.append({"point": stage.name, "kind": stage.kind, "model": stage.arch, "teacher": ", ".join(stage.sources) or None,
                     **describe(accs), "seeds": list(seeds), "test_acc": accs, "diverged": 0})
    base = next((r["mean"] for r in rows if r["point"] == baseline), None)
    for r in rows:
        r["vs_baseline"] = None if base is None or r["kind"] != "distill" else r["mean"] - base
    summary = {"name": name, "seeds": list(seeds), "baseline": baseline,
               "stages": [{"stage": r.pop("point"), **{k: v for k, v in r.items() if k != "diverged"}} for r in rows]}
    if distributed.is_main():
        write_text_atomic(root / PIPELINE_SWEEP_JSON, json.dumps(summary, indent=2) + "\n")
    table_rows = [{"point": s["stage"], "diverged": 0, **s} for s in summary["stages"]]
    echo(format_table(table_rows, baseline, label="stage"))
    return summary
