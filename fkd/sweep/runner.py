"""``fkd sweep``: train every student of a :class:`~fkd.sweep.plan.SweepPlan`, group by group.

Within a group the students share what a separate ``distill`` run each would repeat: the process
start-up, the data on the device, the teacher (loaded once, its outputs cached once and gathered by
each student's own sample indices) and one step function. Each student has its own initialisation,
data order and augmentation (its seed), its own random key, its optimizer's hyper-parameters (learning
rate, momentum, weight decay, betas, the schedule's numbers: 0-d tensors in its optimizer state, see
:mod:`fkd.optim`) and its term numbers (weights, temperature: ``state["hyper"]``), so one traced or
compiled step serves them all. A group is a :class:`~fkd.population.Population` trained by the one
loop, :func:`fkd.loop.run_epochs`: vmapped on CUDA, the same per-student step in a loop on a CPU
(``--strategy``; see :mod:`fkd.population`).

When the training view is random, the teacher cannot be cached: the students then share one data
order (seeds vary initialisation only) and the teacher runs once per batch for all of them ("shared
order"); otherwise each student follows its own order ("independent orders"). Which is used is printed
at start.

A student whose loss turns non-finite is frozen at its last good parameters
(:func:`fkd.population.freeze_diverged`), marked diverged, and the sweep goes on. Checkpoints
(``checkpoints/latest.pt``) hold the states of the running group's students and the results of the
finished groups; SIGINT/SIGTERM save one and stop, ``--resume`` continues bit-exactly on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import attrs
import torch

from fkd import distributed
from fkd.atomic import remove_stale_temporaries
from fkd.cache import teacher_batch_outputs
from fkd.checkpoint import load_checkpoint, save_checkpoint
from fkd.config import dumps
from fkd.data import load_data
from fkd.data.strong import strong_view_for
from fkd.data.transfer import describe as describe_transfer
from fkd.data.transforms import augments
from fkd.distill_setup import (build_students, ema_decay, load_teacher_for, member_checkpoint, preflight,
                               teacher_cache, teacher_paths, with_teacher)
from fkd.errors import CheckpointError, FkdError
from fkd.evaluate import evaluate_model
from fkd.log_sinks import open_run_log
from fkd.loop import LoopSpec, StopRequest, run_epochs, steps_per_epoch
from fkd.mixup import describe as describe_mixing
from fkd.mixup import make_mixer
from fkd.models.cohort import Cohort
from fkd.models.from_config import build_student
from fkd.optim import optimizer_from_config
from fkd.population import STRATEGIES, Population, choose_strategy, freeze_diverged
from fkd.pretrain import pretrain_terms, pretraining_terms
from fkd.pytree import tree_map, tree_to
from fkd.rundir import RunDir, write_text_atomic
from fkd.run_setup import build_training
from fkd.runlock import RunLock
from fkd.run_start import check_one_batch, check_same_structure
from fkd.step import init_train_state, make_eval_step, maybe_compile
from fkd.sweep.plan import Group, Student, SweepPlan, hyper_values
from fkd.sweep.stats import MIN_SEEDS_FOR_INTERVAL, format_table, summarize

__all__ = ["STRATEGIES", "SAVE_CHOICES", "auto_chunk", "choose_strategy", "run_sweep", "student_state"]

SAVE_CHOICES = ("none", "best", "all")


def auto_chunk(plan: SweepPlan, strategy: str, device: torch.device, memory_fraction: float = 0.6) -> int | None:
    """How many students of a group to stack at once; None when all fit (or nothing is stacked).

    Only a vmapped group on CUDA holds every student's activations at once. Its need is estimated from
    one student's parameters: weights, gradients, two optimizer moments and the updates (5x the
    parameter bytes) plus activations, taken as 4x the weights at this batch size -- deliberately
    generous, since a chunk too small only costs time, one too large stops the run. The estimate is
    checked against ``memory_fraction`` of the free device memory.
    """
    if strategy != "vmap" or device.type != "cuda":
        return None
    from fkd.models import param_count

    largest = max(len(g.students) for g in plan.groups)
    base = plan.groups[0].base.config
    _, params, buffers = build_student(base, 10, (), device="cpu")
    per_student = 9 * 4 * (param_count(params) + sum(b.numel() for b in buffers.values()))
    free, _ = torch.cuda.mem_get_info(device)
    fits = max(1, int(memory_fraction * free // max(per_student, 1)))
    return None if fits >= largest else fits


@attrs.frozen(eq=False)
class GroupSetup:
    """What the students of one group share."""

    group: Group
    data: object
    objective: object
    student: object
    shapes: object
    teacher: object
    teacher_vars: dict | None
    lookup: Callable | None
    step: Callable  # the single-student step (uncompiled: the population wraps it)
    layout: Callable
    augment: bool
    steps_per_epoch: int
    mixes: bool = False  # function matching: the step mixes images and runs the teacher on them itself
    part: tuple | None = None  # under torchrun: [lo, hi) of the group's students this rank trains
    eval_step: Callable | None = None  # the test pass's step, built (and compiled) once for the group

    @property
    def members(self) -> tuple:
        """The students this process trains: the whole group, or its rank's part under torchrun."""
        return self.group.students if self.part is None else self.group.students[self.part[0]:self.part[1]]

    @property
    def shared_order(self) -> bool:
        """Random views and a live teacher: all students see the same batches (seeds vary the init only).
        Not with function matching: each student's step mixes with its own key and runs the teacher there."""
        return self.augment and self.objective.needs_teacher and not self.mixes

    def init_state(self, s: Student, device) -> dict:
        return student_state(s.config, self.objective, self.shapes, self.data.num_classes, self.steps_per_epoch,
                             self.layout, hyper_values(s), device)


def student_state(cfg, objective, shapes, num_classes: int, steps_per_epoch: int, layout: Callable,
                  hyper: dict | None, device) -> dict:
    """A sweep student's initial train state: initialised from ``cfg.seed`` exactly as ``distill`` does, with
    its own optimizer hyper-parameters (from ``cfg.train.optimizer``, in its optimizer state) and its term
    numbers (``hyper``, Python floats) as 0-d tensors under ``"hyper"`` when given."""
    _, params, buffers = build_students(cfg, num_classes, objective.student_feature_names, device=device)
    obj_params, obj_state = objective.init(shapes, seed=cfg.seed, device=device)
    optimizer, _ = optimizer_from_config(cfg.train.optimizer, steps_per_epoch, cfg.train.epochs)
    state = init_train_state(params, buffers, optimizer, objective_params=obj_params, objective_state=obj_state,
                             seed=cfg.seed, ema=objective.needs_teacher and ema_decay(cfg) is not None)
    if hyper is not None:
        state["hyper"] = tree_map(lambda v: torch.tensor(float(v), device=device), hyper)
    return layout(state)


def _data_of(group: Group, device: torch.device, data_cache: dict):
    base = group.base.config
    key = base.data  # a frozen attrs value: equal data configs share the data on the device
    if key not in data_cache:
        data_cache.clear()  # one data set on the device at a time
        data_cache[key] = load_data(base.data, device=device)
    return data_cache[key]


def check_groups(plan: SweepPlan, run: RunDir, device: torch.device, data_cache: dict) -> None:
    """Every refusal ``distill`` makes about a config, made for every group before the sweep's first write:
    the data (transfer-set contents included), the objective against the real feature shapes, a training
    set of at least one batch, and the teacher checkpoint's path."""
    for group in plan.groups:
        base = group.base.config
        data = _data_of(group, device, data_cache)
        pre = preflight(base, data.num_classes, len(data.train), device, group.base.objective)
        check_one_batch(len(data.train), base.data.batch_size, "student")
        if pre.objective.needs_teacher and ema_decay(base) is None:
            teacher_paths(base, run)


def check_teachers(groups, data_cache: dict, device: torch.device, *, echo: Callable, quiet: bool) -> None:
    """The teachers of ``groups[1:]`` that differ from ``groups[0]``'s (set up already), fitted when missing
    and allowed, and loaded once on the CPU to check they fit their configs: what ``distill`` does before
    its first write."""
    def teacher_of(group) -> tuple:
        base = group.base.config
        return repr(base.teacher), repr(base.teachers), repr(base.data), group.base.objective.teacher_feature_names

    seen = {teacher_of(groups[0])} if groups else set()
    for group in groups[1:]:
        base, obj = group.base.config, group.base.objective
        if not obj.needs_teacher or teacher_of(group) in seen:
            continue
        seen.add(teacher_of(group))
        load_teacher_for(base, _data_of(group, device, data_cache), obj, "cpu", echo=echo, quiet=quiet)


def setup_group(group: Group, device: torch.device, *, data_cache: dict, echo: Callable, quiet: bool) -> GroupSetup:
    base = group.base.config
    data = _data_of(group, device, data_cache)
    pre = preflight(base, data.num_classes, len(data.train), device, group.base.objective, echo=echo)
    obj = pre.objective
    augment = augments(base.data)
    if (note := describe_transfer(base.data, data.train.labels)) is not None:
        echo(note)
    if base.data.mixes:
        echo(describe_mixing(base.data.mixup, base.data.cutmix))
    teacher = lookup = None
    if obj.needs_teacher:
        teacher = load_teacher_for(base, data, obj, device, echo=echo, quiet=quiet)
        lookup, _ = teacher_cache(base, data, teacher, augment=augment, device=device, echo=echo)
    nb = steps_per_epoch(len(data.train), base.data.batch_size)
    training = build_training(
        pre.student, obj, base.train, params=pre.params, buffers=pre.buffers,
        teacher=teacher.model if teacher else None, steps_per_epoch=nb, batch_size=base.data.batch_size,
        seed=base.seed, augment=augment, device=device, compile="off", quiet=True,
        mix=make_mixer(base.data.mixup, base.data.cutmix), ema_decay=ema_decay(base) if obj.needs_teacher else None,
        strong_view=strong_view_for(base.data, obj), split_batches=False)  # under torchrun each rank trains students of its own
    teacher_vars = training.layout(teacher.variables) if teacher is not None and teacher.variables else None
    return GroupSetup(group, data, obj, pre.student, with_teacher(pre.shapes, teacher),
                      teacher.model if teacher else None, teacher_vars, lookup, training.step, training.layout, augment,
                      nb, base.data.mixes, eval_step=make_eval_step(pre.student, device=device, compile=base.train.compile))


def group_batches(setup: GroupSetup, strategy: str) -> Callable:
    """``batches(epoch, start)`` for a group: per step, one batch dict per student (each its own order) or,
    in shared order, the one batch they all take -- carrying the teacher's outputs, computed once, when
    the students run in a loop (vmapped, the step runs the teacher once itself, unbatched)."""
    cfg = setup.group.base.config
    seeds = [cfg.seed] if setup.shared_order else [s.seed for s in setup.members]

    def batches(epoch: int, start: int):
        iters = [setup.data.train.batches(cfg.data.batch_size, shuffle=True, epoch=epoch, seed=seed, start=start,
                                          augment=setup.augment, drop_last=True) for seed in seeds]
        for parts in zip(*iters):
            out = []
            for x, y, idx in parts:
                batch = {"x": x, "y": y, "idx": idx}
                if setup.lookup is not None:
                    batch.update(setup.lookup(idx))
                elif setup.shared_order and strategy == "loop" and setup.teacher_vars is not None:
                    logits, feats = teacher_batch_outputs(setup.teacher, setup.teacher_vars, x, cfg.train.precision)
                    batch.update({"teacher_logits": logits, "teacher_features": feats})
                out.append(batch)
            yield out[0] if setup.shared_order else out

    return batches


def _evaluate(setup: GroupSetup, state: dict, device) -> float:
    cfg = setup.group.base.config
    result = evaluate_model(setup.student, state["params"]["model"], state["buffers"], setup.data.test,
                            batch_size=cfg.data.eval_batch_size, num_classes=setup.data.num_classes, device=device,
                            shard=False,  # under torchrun each rank evaluates its own students
                            compile=cfg.train.compile, eval_step=setup.eval_step)
    return result["accuracy"]


def run_sweep(plan: SweepPlan, run: RunDir, device: torch.device, *, strategy: str = "auto", save: str = "none",
              resume: bool = False, quiet: bool = False, echo: Callable = print) -> dict:
    """Train every student of ``plan`` into ``run``; returns the summary written to ``sweep_summary.json``."""
    if save not in SAVE_CHOICES:
        raise FkdError(f"--save must be one of {', '.join(SAVE_CHOICES)} (got {save!r}).")
    strategy = choose_strategy(strategy, device)
    sweep_text = _sweep_text(plan)
    world = distributed.world()  # under torchrun: each rank trains a part of every group, rank 0 writes
    smallest = min(len(g.students) for g in plan.groups)
    if smallest < world.size:
        raise distributed.SharedError(f"a group of this sweep has {smallest} students, fewer than the {world.size} "
                                      "processes sharing them; start fewer processes or sweep more seeds.")
    data_cache: dict = {}
    check_groups(plan, run, device, data_cache)
    # one process per sweep directory; a refusal below leaves it as it was
    with distributed.on_main(lambda: RunLock(run.path)):
        saved = world.from_main(lambda: _resume_point(run, sweep_text, resume))
        first = saved["group"] if saved else 0
        # the first group to train is set up (its teacher fitted and loaded) and the other groups'
        # teachers checked before anything is written, as distill does
        setup = _setup_part(plan.groups[first], device, data_cache, echo, quiet)
        if saved:
            check_same_structure(saved["states"][0], setup.init_state(setup.group.students[0], device), run)
        check_teachers(plan.groups[first:], data_cache, device, echo=echo, quiet=quiet)
        base = plan.groups[0].base.config
        run_log = open_run_log(base.log, run.path, config_text=dumps(base), name=base.name) if world.is_main else None
        if world.is_main:
            run.prepare()
            remove_stale_temporaries(run.path, [run.config_path.name, "grid.json", "sweep.jsonl",
                                                "sweep_summary.json", "sweep.png"])
            remove_stale_temporaries(run.checkpoint_dir, [run.latest.name])
            write_text_atomic(run.config_path, dumps(plan.groups[0].base.config))
            write_text_atomic(run.path / "grid.json", sweep_text)
        echo(f"sweep: {plan.describe()}, strategy {strategy} "
             f"({'vmapped step' if strategy == 'vmap' else 'one step per student, in a loop'}) on {device}"
             + (f", students spread over {world.size} processes" if world.parallel else "")
             + f"; directory {run.path}")
        finished = saved["finished"] if saved else []
        records = saved["records"] if saved else []
        with StopRequest() as stop:
            try:
                for gi, group in enumerate(plan.groups):
                    if gi < first:
                        continue
                    if gi > first:
                        setup = _setup_part(group, device, data_cache, echo, quiet)
                    where = saved if saved and gi == saved["group"] else None
                    finished += _train_group(gi, len(plan.groups), setup, strategy, device, run, where, records,
                                             finished, sweep_text, stop, quiet, echo, save, run_log=run_log)
                    saved = None
            finally:
                if run_log is not None:
                    run_log.close()
        summary = _write_outputs(plan, run, finished, strategy, echo) if world.is_main else {}
    return summary


def _setup_part(group: Group, device, data_cache: dict, echo: Callable, quiet: bool) -> GroupSetup:
    """:func:`setup_group`, with this rank's part of the students under torchrun."""
    setup = setup_group(group, device, data_cache=data_cache, echo=echo, quiet=quiet)
    world = distributed.world()
    return attrs.evolve(setup, part=world.part(len(group.students))) if world.parallel else setup


_RECORD_KEYS = ("epoch", "train_loss", "train_acc", "test_acc", "diverged")


def _train_group(gi, n_groups, setup: GroupSetup, strategy, device, run, where, records, finished, sweep_text,
                 stop, quiet, echo, save, run_log=None) -> list[dict]:
    """Train one group as a population through :func:`fkd.loop.run_epochs`; returns its students' results.

    ``run_log`` (:func:`fkd.log_sinks.open_run_log`): each student's curves, and its grid point, seed and
    final metrics once it has finished."""
    students = setup.members
    cfg = setup.group.base.config
    world = distributed.world()
    log = run_log if run_log and not world.parallel else None  # one writer per student, from rank 0's process
    population = Population(len(students), strategy, shared_batch=setup.shared_order)
    step = maybe_compile(population.wrap(freeze_diverged(setup.step)), cfg.train.compile, device.type,
                         cfg.train.compile_mode)
    if where is not None:
        lo, hi = setup.part if setup.part is not None else (0, len(students))
        states = population.gather([tree_to(st, device) for st in where["states"][lo:hi]])
        start_epoch, start_batch = where["epoch"], where["batch"]
    else:
        states = population.gather([_pretrained(setup, setup.init_state(s, device), s, log) for s in students])
        start_epoch, start_batch = 0, 0
    echo(f"group {gi + 1}/{n_groups}: {len(setup.group.students)} students, "
         f"{'shared order: seeds vary initialisation only' if setup.shared_order else 'independent orders'}"
         f"{', teacher outputs cached' if setup.lookup is not None else ''}")

    def checkpoint(states, epoch: int, batch: int) -> None:
        # every rank's students, in group order, gathered to be written by rank 0
        members = world.gather([tree_map(lambda t: t.detach().cpu(), st) for st in population.members(states)])
        if world.is_main:
            save_checkpoint(run.latest, {
                "sweep": sweep_text, "group": gi, "epoch": epoch, "batch": batch,
                "states": members, "finished": finished, "records": records,
            }, "sweep_run")

    def on_epoch(member_records: list[dict]) -> None:
        mine = [{"student": s.label, "point": _point_label(s), "seed": s.seed, "group": gi,
                 **{k: v for k, v in r.items() if k in _RECORD_KEYS or k.startswith("train_")}}
                for s, r in zip(students, member_records)]
        records.extend(world.gather(mine))
        if world.is_main:
            write_text_atomic(run.path / "sweep.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    spec = LoopSpec("student", cfg.train.epochs, cfg.data.batch_size, cfg.seed, setup.augment, cfg.train.log_every,
                    quiet=quiet, title=f"group {gi + 1}/{n_groups}",
                    detail=f"{len(setup.group.students)} students"
                           + (f" over {world.size} processes" if world.parallel else ""),
                    on_non_finite="freeze", precision=cfg.train.precision)
    states = run_epochs(step, states, setup.data.train, spec, population=population,
                        batches=group_batches(setup, strategy), teacher_vars=setup.teacher_vars,
                        evaluate=lambda st: [_evaluate(setup, m, device) for m in population.members(st)],
                        save=checkpoint, on_epoch=on_epoch, start_epoch=start_epoch, start_batch=start_batch,
                        stop=stop, sink=log.sink([s.label for s in students]) if log else None)
    students = setup.group.students  # the whole group from here on: rank 0 saves what was asked for
    states_now = population.members(states)
    if world.parallel:
        states_now = world.gather([tree_map(lambda t: t.detach().cpu(), st) for st in states_now]
                                  if save != "none" else [None] * len(states_now))
    results = []
    for s, st in zip(students, states_now):
        last = next(r for r in reversed(records) if r["student"] == s.label)
        results.append({"student": s.label, "point": _point_label(s), "seed": s.seed, "group": gi,
                        "test_acc": last["test_acc"], "diverged": last["diverged"],
                        "baseline": not s.objective.needs_teacher})
        if run_log is not None:  # its hyper-parameters and final metrics, for TensorBoard's HParams view
            run_log.finished(s.label, {**dict(s.point), "seed": s.seed}, last, cfg.train.epochs * setup.steps_per_epoch)
        if save == "all" and world.is_main:
            _save_student(run, setup, s, st)
    if save == "best":  # the best of the whole sweep so far: replaces an earlier group's best
        best = max((r for r in results if not r["diverged"]), key=lambda r: r["test_acc"], default=None)
        before = max((r for r in finished if not r["diverged"]), key=lambda r: r["test_acc"], default=None)
        if best is not None and (before is None or best["test_acc"] > before["test_acc"]) and world.is_main:
            k = [r["student"] for r in results].index(best["student"])
            _save_student(run, setup, students[k], states_now[k])
            if before is not None:
                _remove_student(run, before["student"])
    return results


def _remove_student(run: RunDir, label: str) -> None:
    """Remove what :func:`_save_student` wrote for ``label`` (a file, or a cohort's folder of members)."""
    (run.path / "students" / f"{label}.pt").unlink(missing_ok=True)
    folder = run.path / "students" / label
    if folder.is_dir():
        for member in folder.glob("*.pt"):
            member.unlink()
        folder.rmdir()


def _pretrained(setup: GroupSetup, state: dict, s: Student, run_log=None) -> dict:
    """A fresh student's state with its terms' pre-phase run (:mod:`fkd.pretrain`), as ``distill`` does; its
    losses go to the student's own ``run_log`` writers."""
    if not pretraining_terms(setup.objective):
        return state
    cfg = s.config
    sink = run_log.sink([s.label]) if run_log else None
    return pretrain_terms(setup.objective, state, teacher=setup.teacher, teacher_vars=setup.teacher_vars,
                          source=setup.data.train, batch_size=cfg.data.batch_size, seed=cfg.seed, augment=setup.augment,
                          on_epoch=sink.pretrain if sink else None)


def _point_label(s: Student) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.point) or "base"


def _save_student(run: RunDir, setup: GroupSetup, s: Student, state: dict) -> Path:
    """One student's weights as a run checkpoint that ``fkd evaluate`` reads; a cohort's members each as
    their own, ``students/<label>/<member>.pt`` (:func:`fkd.distill_setup.member_checkpoint`)."""
    if isinstance(setup.student, Cohort):
        folder = run.path / "students" / s.label
        for name in setup.student.names:
            save_checkpoint(folder / f"{name}.pt", member_checkpoint(s.config, setup.student, state, name), "student_run")
        return folder
    path = run.path / "students" / f"{s.label}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = tree_map(lambda t: t.detach().cpu(), {k: state[k] for k in ("params", "frozen", "buffers")})
    save_checkpoint(path, {"state": cpu, "model": dict(setup.student.spec), "config": dumps(s.config),
                           "epoch": s.config.train.epochs, "batch": 0}, "student_run")
    return path


def _sweep_text(plan: SweepPlan) -> str:
    """The resolved grid (what ``--resume`` must find unchanged), as JSON."""
    return json.dumps({
        "seeds": list(plan.seeds),
        "grid": {k: list(v) for k, v in plan.axes},
        "groups": [[s.label for s in g.students] for g in plan.groups],
        "configs": {s.label: dumps(s.config) for s in plan.students},
    }, indent=1) + "\n"


def _resume_point(run: RunDir, sweep_text: str, resume: bool) -> dict | None:
    if run.latest.exists():
        if not resume:
            raise FkdError(f"'{run.path}' already holds a sweep (checkpoints/latest.pt); pass --resume to continue "
                           "it or --out DIR to start a new one.")
        saved = load_checkpoint(run.latest, "sweep_run")
        if saved["sweep"] != sweep_text:
            raise CheckpointError(f"the sweep in '{run.path}' was started with another config or grid; resume it "
                                  "with the same --config, --set, --seeds and --grid, or start a new one with --out.")
        return saved
    if resume:
        raise FkdError(f"nothing to resume in '{run.path}' (no checkpoints/latest.pt); run without --resume.")
    return None


def _write_outputs(plan: SweepPlan, run: RunDir, finished: list[dict], strategy: str, echo: Callable) -> dict:
    baselines = [f["point"] for f in finished if f["baseline"]]
    baseline = baselines[0] if baselines and len(set(baselines)) == 1 else None
    rows = summarize(finished, baseline)
    summary = {"strategy": strategy, "groups": len(plan.groups), "students": len(finished),
               "seeds": list(plan.seeds), "grid": {k: list(v) for k, v in plan.axes},
               "baseline": baseline, "points": rows, "students_final": finished}
    write_text_atomic(run.path / "sweep_summary.json", json.dumps(summary, indent=2) + "\n")
    from fkd.sweep.plot import plot_sweep
    from fkd.titles import sweep_title

    interval = all(r["n"] >= MIN_SEEDS_FOR_INTERVAL for r in rows if r["n"])
    plot_sweep(plan, rows, run.path / "sweep.png",
               sweep_title(plan.groups[0].base.config, run.path, plan.seeds, interval=interval))
    echo(format_table(rows, baseline))
    return summary
