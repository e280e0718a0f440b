"""``fkd distill``: train a student against a teacher, end to end.

1. load the data; 2. load the teacher checkpoint (fitting it first when it is missing and
``teacher.fit_if_missing`` allows); 3. build the student and, for feature terms, one FitNets regressor
per feature pair (shapes probed with one forward pass); 4. cache the teacher's outputs when the
training view is deterministic; 5. train with :func:`fkd.fit.fit`; 6. write ``summary.json`` and
``curves.png`` and print a teacher-vs-student table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from fkd import objective as objective_lib
from fkd.cache import build_cache, cache_key
from fkd.config import Config, dumps
from fkd.data import load_data
from fkd.errors import CheckpointError
from fkd.fit import fit
from fkd.loop import LoopSpec, steps_per_epoch
from fkd.models import build_model, param_count, size_bytes
from fkd.rundir import RunDir, plot_curves
from fkd.step import init_train_state, make_train_step, to_channels_last
from fkd.teacher import build_teacher, fit_teacher, load_teacher, teacher_checkpoint_path
from fkd.training import cpu_latency_ms, current_lr, make_evaluator, optimizer_from_config


def feature_shapes(model, params: dict, buffers: dict, image_size: int, device) -> dict:
    """``{feature name: shape without batch}`` from one eval-mode forward pass of a zero image."""
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    with torch.no_grad():
        _, feats, _ = model.apply(params, buffers, x, train=False)
    return {k: tuple(v.shape[1:]) for k, v in feats.items()}


def build_student(cfg: Config, num_classes: int, device):
    """The student of ``cfg`` -> ``(model, params, buffers)``, returning the configured features."""
    s = cfg.student
    names = cfg.distill.student_features if cfg.distill.uses_features else ()
    return build_model(s.arch, num_classes, cfg.data.image_size, names, widths=s.widths,
                       batch_norm=s.batch_norm, seed=cfg.seed, device=device)


def ensure_teacher(cfg: Config, data, device, *, echo: Callable = print, quiet: bool = False) -> Path:
    """The teacher checkpoint path, fitting the teacher first when it is missing and allowed."""
    path = teacher_checkpoint_path(cfg)
    if path.is_file():
        return path
    if not cfg.teacher.fit_if_missing:
        raise CheckpointError(
            f"teacher checkpoint '{path}' does not exist; fit it first with `fkd teacher --config ...`, "
            "or set teacher.fit_if_missing = true to fit it here."
        )
    echo(f"teacher checkpoint {path} not found: fitting the teacher first ([teacher] section, "
         f"{cfg.teacher.arch}, {cfg.teacher.mode}, {cfg.teacher.train.epochs} epochs)")
    teacher_run = RunDir(path.parent)
    fit_teacher(cfg, data, device, teacher_run, resume=teacher_run.latest.exists(), quiet=quiet, echo=echo)
    return path


def preflight(cfg: Config, num_classes: int, device) -> tuple:
    """Build the student and check every name and feature pair before anything is trained or written.

    Unknown feature names and unmatchable pairs fail here, in a second, instead of after a teacher fit.
    Returns ``(student, params, buffers, objective, student_shapes, teacher_shapes)``.
    """
    obj = objective_lib.from_config(cfg.distill)
    student, params, buffers = build_student(cfg, num_classes, device)
    s_shapes = t_shapes = {}
    if obj.needs_features:
        s_shapes = feature_shapes(student, params, buffers, cfg.data.image_size, device)
        teacher, t_params, t_buffers = build_teacher(cfg, num_classes, cfg.distill.teacher_features)
        t_shapes = feature_shapes(teacher, t_params, t_buffers, cfg.data.image_size, "cpu")
        objective_lib.check_pairs(obj, s_shapes, t_shapes)
    return student, params, buffers, obj, s_shapes, t_shapes


def run_distill(cfg: Config, run: RunDir, device: torch.device, *, resume: bool = False, quiet: bool = False,
                echo: Callable = print) -> dict:
    """Distill per ``cfg`` into ``run``; returns the summary written to ``summary.json``."""
    data = load_data(cfg.data, device=device, seed=cfg.seed)
    student, params, buffers, obj, s_shapes, t_shapes = preflight(cfg, data.num_classes, device)
    run.prepare()
    teacher = teacher_vars = None
    teacher_acc = None
    if obj.needs_teacher:
        t_path = ensure_teacher(cfg, data, device, echo=echo, quiet=quiet)
        t_names = cfg.distill.teacher_features if obj.needs_features else ()
        teacher, teacher_vars, teacher_acc = load_teacher(t_path, cfg, data.num_classes, t_names, device)
    run.write_config(cfg)
    regressors = obj.init_regressors(s_shapes, t_shapes, seed=cfg.seed, device=device) if obj.needs_features else {}

    batch_extras = None
    cache_note = "off"
    if obj.needs_teacher and cfg.teacher.cache != "off" and not cfg.data.augments:
        key = cache_key(t_path, data.fingerprint, teacher.feature_names, cfg.train.precision)
        cache = build_cache(teacher, teacher_vars, data.train, mode=cfg.teacher.cache, key=key,
                            cache_dir=cfg.teacher.cache_dir, batch_size=cfg.data.eval_batch_size,
                            precision=cfg.train.precision, device=device, echo=echo)
        batch_extras = cache.lookup
        cache_note = cache.where

    nb = steps_per_epoch(len(data.train), cfg.data.batch_size)
    opt, schedule = optimizer_from_config(cfg.train.optimizer, max(nb, 1), cfg.train.epochs)
    tr = cfg.train
    channels_last = tr.channels_last and device.type == "cuda"
    layout = to_channels_last if channels_last else (lambda tree: tree)
    state = layout(init_train_state(params, buffers, opt, regressors=regressors))
    if teacher_vars is not None:
        teacher_vars = layout(teacher_vars)
    step = make_train_step(student, obj, opt, teacher=teacher, precision=tr.precision, compile=tr.compile,
                           compile_mode=tr.compile_mode, channels_last=channels_last, device=device)

    evaluate = make_evaluator(student, data.test, lambda st: (st["params"]["model"], st["buffers"]),
                              batch_size=cfg.data.eval_batch_size, num_classes=data.num_classes, device=device)

    spec = LoopSpec("student", tr.epochs, cfg.data.batch_size, cfg.seed, cfg.data.augments, tr.log_every,
                    tr.checkpoint_every, quiet)
    echo(f"student {cfg.student.arch}, method {cfg.distill.method} "
         f"({', '.join(f'{k} {w:g}' for k, w in obj.weights.items())}), teacher cache: {cache_note}")
    state = fit(run, kind="student_run", spec=spec, step=step, state=state, source=data.train, device=device,
                resume=resume, config_text=dumps(cfg), evaluate=lambda st: evaluate(st)["accuracy"],
                teacher_vars=teacher_vars,
                batch_extras=batch_extras, learning_rate=lambda st: current_lr(schedule, st),
                extra_payload=lambda st: {"model": dict(student.spec)})

    final = evaluate(state)
    s_params = param_count(state["params"]["model"])
    summary = {
        "kind": "student",
        "method": cfg.distill.method,
        "data": cfg.data.name,
        "data_fingerprint": data.fingerprint,
        "student_arch": cfg.student.arch,
        "student_test_acc": final["accuracy"],
        "student_per_class_acc": final["per_class"],
        "student_params": s_params,
        "student_size_bytes": size_bytes(state["params"]["model"], state["buffers"]),
        "student_cpu_latency_ms": cpu_latency_ms(student, state["params"]["model"], state["buffers"],
                                                 cfg.data.image_size),
        "baseline_test_acc": find_baseline(run, data.fingerprint, cfg),
        "epochs": cfg.train.epochs,
        "seed": cfg.seed,
    }
    if teacher is not None:
        t_params = param_count(teacher_vars["params"])
        summary.update({
            "teacher_arch": cfg.teacher.arch,
            "teacher_checkpoint": str(t_path),
            "teacher_test_acc": teacher_acc,
            "teacher_params": t_params,
            "teacher_size_bytes": size_bytes(teacher_vars["params"], teacher_vars["buffers"]),
            "teacher_cpu_latency_ms": cpu_latency_ms(teacher, teacher_vars["params"], teacher_vars["buffers"],
                                                     cfg.data.image_size),
            "compression_ratio": t_params / s_params,
        })
    run.write_summary(summary)
    plot_curves(run.read_metrics(), run.curves_path)
    echo(format_table(summary))
    return summary


def find_baseline(run: RunDir, fingerprint: str, cfg: Config) -> float | None:
    """Test accuracy of a finished baseline run beside this one: method ``none``, same data, student,
    epochs and seed (so the comparison isolates the distillation loss)."""
    if cfg.distill.method == "none":
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
    return "\n".join(lines)
