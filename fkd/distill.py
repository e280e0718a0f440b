"""``fkd distill``: train a student against a teacher, end to end.

1. load the data; 2. build the objective from ``[distill]`` and the student, and check every feature
name and pair (shapes probed with one forward pass); 3. check the teacher checkpoint's path, lock the
run directory and decide whether the run starts fresh or resumes (:mod:`fkd.run_start`); 4. load the
teacher checkpoint when a term consumes the teacher (fitting it first when it is missing and
``teacher.fit_if_missing`` allows); 5. initialise the terms' parameters and state (FitNets regressors,
memories) and the train state, checked against a checkpoint being resumed -- only now is anything
written to the run directory; 6. cache the teacher's outputs when the training view is deterministic;
7. train with :func:`fkd.fit.fit`; 8. write ``summary.json`` and ``curves.png`` and print a
teacher-vs-student table.
"""

from __future__ import annotations

import json
from typing import Callable

import torch

from fkd import announce, distributed, latency, titles
from fkd.config import Config, dumps
from fkd.data import load_data
from fkd.data.transfer import describe as describe_transfer
from fkd.data.strong import strong_view_for
from fkd.data.transforms import augments
from fkd.checkpoint import save_checkpoint
from fkd.distill_setup import (ema_decay, load_teacher_for, member_checkpoint, preflight, teacher_cache,
                               teacher_paths, with_teacher)
from fkd.evaluate import cpu_latency, evaluate_model, latency_entries, make_evaluator
from fkd.fit import fit
from fkd.log_sinks import open_run_log
from fkd.loop import steps_per_epoch
from fkd.mixup import describe as describe_mixing
from fkd.mixup import make_mixer
from fkd.losses import ensemble_distribution
from fkd.models import param_count, size_bytes
from fkd.models.cohort import Cohort
from fkd.pretrain import pretrain_terms, pretraining_terms
from fkd.pytree import tree_to
from fkd.rundir import RunDir, plot_curves
from fkd.run_setup import build_training
from fkd.run_start import decide_start
from fkd.objective import Objective
from fkd.runlock import RunLock


def run_distill(cfg: Config, run: RunDir, device: torch.device, *, resume: bool = False, quiet: bool = False,
                echo: Callable = print, objective: Objective | None = None) -> dict:
    """Distill per ``cfg`` into ``run``; returns the summary written to ``summary.json``.

    Everything that can refuse the command -- the config, the features, the teacher checkpoint, the run
    directory's state (see :mod:`fkd.run_start`) -- is checked before the first write, holding the run's
    lock, so a refused command leaves the run directory as it was.
    """
    data = load_data(cfg.data, device=device)
    pre = preflight(cfg, data.num_classes, len(data.train), device, objective, echo=echo)
    obj, student = pre.objective, pre.student
    if obj.needs_teacher and ema_decay(cfg) is None:
        teacher_paths(cfg, run)  # each checkpoint there (or to be fitted, outside this run's directory)
    world = distributed.world()  # under torchrun: rank 0 decides, locks and writes (see fkd.distributed)
    with distributed.on_main(lambda: RunLock(run.path)):
        start = world.from_main(lambda: decide_start(
            run, kind="student_run", config_text=dumps(cfg), resume=resume, num_examples=len(data.train),
            batch_size=cfg.data.batch_size, label="student"))
        echo(announce.distill_start(cfg, obj.weights, num_images=len(data.train), run_path=run.path, device=device,
                                    done_epochs=start.epoch))
        teacher = None
        if obj.needs_teacher:
            teacher = load_teacher_for(cfg, data, obj, device, echo=echo, quiet=quiet)
        objective_params, objective_state = obj.init(with_teacher(pre.shapes, teacher), seed=cfg.seed, device=device)
        augment = augments(cfg.data)
        training = build_training(
            student, obj, cfg.train, params=pre.params, buffers=pre.buffers, objective_params=objective_params,
            objective_state=objective_state, teacher=teacher.model if teacher else None,
            steps_per_epoch=steps_per_epoch(len(data.train), cfg.data.batch_size), batch_size=cfg.data.batch_size,
            seed=cfg.seed, augment=augment, device=device, quiet=quiet,
            mix=make_mixer(cfg.data.mixup, cfg.data.cutmix), ema_decay=ema_decay(cfg) if obj.needs_teacher else None,
            strong_view=strong_view_for(cfg.data, obj))
        start.check_state(training.state)
        run_log = open_run_log(cfg.log, run.path, config_text=dumps(cfg), name=cfg.name) if world.is_main else None
        if world.is_main:
            start.begin(echo=echo)
            run.write_config(cfg)

        if (note := describe_transfer(cfg.data, data.train.labels)) is not None:
            echo(note)
        if cfg.data.mixes:
            echo(describe_mixing(cfg.data.mixup, cfg.data.cutmix))
        batch_extras, cache_note = None, "off"
        teacher_vars = None
        if teacher is not None:
            batch_extras, cache_note = teacher_cache(cfg, data, teacher, augment=augment, device=device, echo=echo)
            if teacher.variables is not None:
                teacher_vars = training.layout(teacher.variables)
        evaluate = make_evaluator(student, data.test, lambda st: (st["params"]["model"], st["buffers"]),
                                  batch_size=cfg.data.eval_batch_size, num_classes=data.num_classes, device=device,
                                  compile=cfg.train.compile)

        if teacher is not None:
            echo(f"teacher cache: {cache_note}")
        initial = training.state
        sink = run_log.sink() if run_log else None
        if start.saved is None and pretraining_terms(obj):  # fresh: fit the terms' pre-phase parts first
            initial = pretrain_terms(obj, initial, teacher=teacher.model, teacher_vars=teacher_vars, source=data.train,
                                     batch_size=cfg.data.batch_size, seed=cfg.seed, augment=augment,
                                     echo=None if quiet else echo, on_epoch=sink.pretrain if sink else None)
        try:
            state = fit(start, spec=training.spec, step=training.step, state=initial, source=data.train,
                        device=device, evaluate=lambda st: evaluate(st)["accuracy"], teacher_vars=teacher_vars,
                        batch_extras=batch_extras, learning_rate=training.learning_rate,
                        extra_payload=lambda st: {"model": dict(student.spec)}, sink=sink)
        finally:
            if run_log is not None:
                run_log.close()
        summary = _summarize(cfg, run, data, student, state, evaluate(state), teacher, obj)
        if world.is_main and isinstance(student, Cohort):
            summary["members"] = save_members(cfg, run, student, state, evaluate(state)["members"])
        if world.is_main:
            run.write_summary(summary)
            plot_curves(run.read_metrics(), run.curves_path,
                        titles.run_title(cfg, run.path, needs_teacher=obj.needs_teacher))
    if world.is_main:
        echo(format_table(summary))
    return summary


def save_members(cfg: Config, run: RunDir, cohort: Cohort, state: dict, accuracies: dict) -> dict:
    """Each cohort member as a student checkpoint of its own, ``<run>/members/<name>.pt``, that ``fkd evaluate``
    and ``fkd export`` read like any student's; returns ``{name: {"arch", "test_acc", "checkpoint"}}``."""
    out = {}
    for name in cohort.names:
        path = run.path / "members" / f"{name}.pt"
        save_checkpoint(path, member_checkpoint(cfg, cohort, state, name), "student_run")
        out[name] = {"arch": cohort.member(name).arch, "test_acc": accuracies[name], "checkpoint": str(path)}
    return out


def _summarize(cfg, run, data, student, state, final, teacher, obj) -> dict:
    """The contents of ``summary.json``: both models' accuracy, size and latency, and the baseline's.

    For a cohort the student figures are its members' means (accuracy) and one member's (size, latency:
    the first); ``members`` lists each (:func:`save_members`)."""
    cohort = student if isinstance(student, Cohort) else None
    if cohort is not None:  # one member's size and latency stand for the student's
        first = student.names[0]
        student = student.member(first)
        state = {**state, "params": {"model": state["params"]["model"][first]}, "buffers": state["buffers"][first]}
    s_params = param_count(state["params"]["model"])
    summary = {
        "kind": "student",
        "method": cfg.distill.preset,
        "terms": obj.weights,
        "data": cfg.data.name,
        "data_fingerprint": data.fingerprint,
        "student_arch": cohort.arch if cohort is not None else cfg.student.arch,
        "student_test_acc": final["accuracy"],
        "student_per_class_acc": final["per_class"],
        "student_params": s_params,
        "student_size_bytes": size_bytes(state["params"]["model"], state["buffers"]),
        **latency_entries(cpu_latency(student, state["params"]["model"], state["buffers"], cfg.data.image_size),
                          "student_"),
        "baseline_test_acc": find_baseline(run, data.fingerprint, cfg),
        "epochs": cfg.train.epochs,
        "seed": cfg.seed,
    }
    if teacher is not None and teacher.variables is None:  # a mean teacher: the average, evaluated here
        ema = evaluate_model(teacher.model, state["ema"]["params"], state["ema"]["buffers"], data.test,
                             batch_size=cfg.data.eval_batch_size, num_classes=data.num_classes, device=state["step"].device)
        summary.update({"teacher_arch": f"{cfg.student.arch} (moving average, decay {cfg.teacher.decay:g})",
                        "teacher_source": "ema", "teacher_test_acc": ema["accuracy"], "teacher_params": s_params,
                        "teacher_size_bytes": summary["student_size_bytes"],
                        "teacher_cpu_latency_ms": summary["student_cpu_latency_ms"],
                        "teacher_cpu_latency": summary["student_cpu_latency"], "compression_ratio": 1.0})
    elif teacher is not None and teacher.members:  # several teachers: each one's figures and the ensemble's
        members = teacher.members
        summary["teachers"] = {
            name: {"arch": cfg.teachers[name].arch, "checkpoint": str(t.path), "test_acc": t.accuracy,
                   "weight": cfg.teachers[name].weight, "params": param_count(t.variables["params"])}
            for name, t in members.items()}
        t_params = sum(m["params"] for m in summary["teachers"].values())
        summary.update({
            "teacher_arch": teacher.model.arch,
            "teacher_test_acc": ensemble_accuracy(teacher, obj, data, cfg),
            "teacher_params": t_params,
            "teacher_size_bytes": sum(size_bytes(t.variables["params"], t.variables["buffers"]) for t in members.values()),
            **latency_entries(ensemble_latency([cpu_latency(t.model, t.variables["params"], t.variables["buffers"],
                                                            cfg.data.image_size) for t in members.values()]),
                              "teacher_"),
            "compression_ratio": t_params / s_params,
        })
    elif teacher is not None:
        teacher_vars = teacher.variables
        t_params = param_count(teacher_vars["params"])
        summary.update({
            "teacher_arch": cfg.teacher.arch,
            "teacher_checkpoint": str(teacher.path),
            "teacher_test_acc": teacher.accuracy,
            "teacher_params": t_params,
            "teacher_size_bytes": size_bytes(teacher_vars["params"], teacher_vars["buffers"]),
            **latency_entries(cpu_latency(teacher.model, teacher_vars["params"], teacher_vars["buffers"],
                                          cfg.data.image_size), "teacher_"),
            "compression_ratio": t_params / s_params,
        })
    return summary


def ensemble_latency(figures: list[dict]) -> dict:
    """The ensemble's latency figure: the sum of its members' (they run one after another), measured alike."""
    first = figures[0]
    return latency.figure(sum(f["ms_per_image"] for f in figures), batch_size=first["batch_size"],
                          threads=first["threads"], repeats=first["repeats"])


def ensemble_accuracy(teacher, obj: Objective, data, cfg: Config) -> float:
    """Test accuracy of the ensemble's prediction ``argmax_c sum_m w_m softmax(z_m)`` (the teachers'
    weights; per example confidence weights would need the label, so they are not used here)."""
    weights = torch.tensor(obj.teacher_weights)
    correct = count = 0
    variables = tree_to(teacher.variables, "cpu")
    model = teacher.model
    with torch.no_grad():
        for x, y, _ in data.test.batches(cfg.data.eval_batch_size, shuffle=False):
            logits, _, _ = model.apply(variables["params"], variables["buffers"], x.cpu(), train=False)
            p = ensemble_distribution(logits.float().movedim(1, 0), 1.0, weights)
            correct += int((p.argmax(-1) == y.cpu()).sum())
            count += len(y)
    return correct / max(count, 1)


def find_baseline(run: RunDir, fingerprint: str, cfg: Config) -> float | None:
    """Test accuracy of a finished baseline run beside this one: method ``none``, same data, student,
    epochs and seed (so the comparison isolates the distillation loss)."""
    if cfg.distill.preset == "none":
        return None
    for summary_path in sorted(run.path.parent.glob("*/summary.json")):
        try:
            s = json.loads(summary_path.read_text())
        except (OSError, ValueError):
            continue
        if (s.get("method") == "none" and s.get("data_fingerprint") == fingerprint
                and s.get("student_arch") == cfg.student.arch and s.get("epochs") == cfg.train.epochs
                and s.get("seed") == cfg.seed):
            return s.get("student_test_acc")
    return None


def format_table(summary: dict) -> str:
    """A small teacher-vs-student comparison table."""
    rows = [("", "test acc", "params", "size MB", "CPU ms/img")]

    def row(name: str, prefix: str) -> None:
        rows.append((
            name,
            f"{summary[f'{prefix}_test_acc']:.2%}",
            f"{summary[f'{prefix}_params']:,}",
            f"{summary[f'{prefix}_size_bytes'] / 1e6:.2f}",
            f"{summary[f'{prefix}_cpu_latency_ms']:.2f}",
        ))

    if "teacher_test_acc" in summary:
        row(f"teacher ({summary['teacher_arch']})", "teacher")
    row(f"student ({summary['student_arch']}, {summary['method']})", "student")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    if summary.get("baseline_test_acc") is not None:
        lines.append(f"baseline student (no distillation): {summary['baseline_test_acc']:.2%}")
    if "compression_ratio" in summary:
        lines.append(f"compression: {summary['compression_ratio']:.1f}x fewer parameters")
    figures = [summary[k] for k in ("teacher_cpu_latency", "student_cpu_latency") if k in summary]
    if figures:
        lines.append(latency_note(figures))
    return "\n".join(lines)


def latency_note(figures: list[dict]) -> str:
    """The table's footnote on how its CPU ms/img column was measured (batch, threads, a busy machine);
    ``figures``: the column's :func:`fkd.latency.measure` dicts, timed alike."""
    fig = figures[-1]
    note = (f"CPU ms/img: batch {fig['batch_size']}, {fig['threads']} thread{'s' if fig['threads'] != 1 else ''}, "
            f"median of {fig['repeats']} calls")
    busy = [f for f in figures if f["busy"]]
    if busy:
        note += f"; busy machine (load {busy[0]['load_1min']:.1f} on {busy[0]['cores']} cores): slower than idle"
    return note
