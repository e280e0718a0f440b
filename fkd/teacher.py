"""Teachers: fit one (``fkd teacher``), save it, and load it back for distillation.

Fit modes (``teacher.mode``):

* ``linear_probe`` -- the notebook's way: the backbone is frozen (and run in eval mode, so its
  BatchNorm statistics stay those of its pretraining), only the classifier head is trained;
* ``finetune``     -- every weight is trained, starting from ``teacher.weights``;
* ``scratch``      -- every weight is trained from a random initialisation.

A teacher checkpoint (kind ``teacher``) holds the model spec, the full params and buffers, and its
test accuracy; it never holds optimizer state.

A teacher is fitted on labeled examples only: with a transfer set (``data.transfer``) the data are read
again without it (:func:`fkd.data.transfer.labeled_only`); ``data.label_fraction`` still applies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from fkd import announce as start_lines
from fkd import distributed, titles
from fkd.checkpoint import load_checkpoint, save_checkpoint
from fkd.config import Config, dumps
from fkd.data import load_data
from fkd.data.transfer import labeled_only
from fkd.data.transforms import augments
from fkd.errors import CheckpointError, ConfigError
from fkd.evaluate import make_evaluator
from fkd.fit import fit
from fkd.log_sinks import open_run_log
from fkd.loop import steps_per_epoch
from fkd.models import Model, head_prefix, param_count, size_bytes
from fkd.models.weight_files import is_weight_file
from fkd.models.from_config import build_teacher
from fkd.objective import from_weights
from fkd.rundir import RunDir, ensure_writable, plot_curves
from fkd.run_setup import build_training
from fkd.run_start import RunStart, config_key, decide_start
from fkd.runlock import RunLock


def weights_as_teacher(cfg: Config) -> Path | None:
    """``teacher.weights``' file when it is the teacher itself (``teacher.checkpoint`` empty, ``teacher.weights`` a
    ``.pth`` / ``.pt`` / ``.safetensors`` state dict, a distillation run): used as it is, with no fit."""
    t = cfg.teacher
    return Path(t.weights) if not t.checkpoint and is_weight_file(t.weights) else None


def teacher_checkpoint_path(cfg: Config, run: RunDir | None = None) -> Path:
    """Where the teacher checkpoint lives: ``teacher.checkpoint``, else ``<run>/teacher.pt`` (a fit), else the
    weight file of :func:`weights_as_teacher`; never a folder."""
    if cfg.teacher.checkpoint:
        path = Path(cfg.teacher.checkpoint)
    elif run is None and (file := weights_as_teacher(cfg)) is not None:
        if not file.is_file():
            raise CheckpointError(f"teacher.weights = '{file}' is not a file; give the path of the teacher's state "
                                  "dict (relative to the working directory).")
        return file
    elif run is None:
        raise ConfigError("teacher.checkpoint is empty; set it to the teacher file to distill from (or "
                          "teacher.weights to a .pth / .safetensors state dict of teacher.arch).")
    else:
        path = run.path / "teacher.pt"
    if path.is_dir():  # found now, not when the fitted teacher is saved over it
        raise ConfigError(f"the teacher checkpoint '{path}' is a folder; set teacher.checkpoint to a file path, "
                          f"e.g. '{path / 'teacher.pt'}'.")
    return path


def _split_trainable(model: Model, params: dict, mode: str) -> tuple[dict, dict]:
    if mode != "linear_probe":
        return params, {}
    head = head_prefix(model.eval_template) + "."
    trainable = {k: v for k, v in params.items() if k.startswith(head)}
    frozen = {k: v for k, v in params.items() if not k.startswith(head)}
    return trainable, frozen


def fit_teacher(
    cfg: Config, data, device: torch.device, run: RunDir, *, resume: bool = False, overwrite: bool = False,
    quiet: bool = False, echo: Callable[[str], None] = print, announce: bool = True,
) -> dict:
    """Fit the teacher of ``cfg`` on ``data``; write its checkpoint and return its summary.

    ``announce``: echo the start line (:func:`fkd.announce.teacher_start`); ``fkd distill`` fitting a
    missing teacher has said so already.

    An existing teacher checkpoint is replaced only with ``overwrite`` or by resuming the run that wrote
    it: a teacher can take hours to fit. Every refusal comes before the first write (see
    :mod:`fkd.run_start`).
    """
    t = cfg.teacher
    if t.mode == "scratch" and t.weights != "none":
        raise ConfigError("teacher.mode = 'scratch' trains from random weights; set teacher.weights = 'none'.")
    if bool((data.train.labels < 0).any()):  # a transfer set: the teacher is fitted on labeled examples only
        data = load_data(labeled_only(cfg.data), device=device)
        echo(f"teacher fit: the {len(data.train)} labeled training images only (data.transfer ignored)")
    ckpt_path = teacher_checkpoint_path(cfg, run)
    model, params, buffers = build_teacher(
        cfg, data.num_classes, weights="none" if t.mode == "scratch" else t.weights, device=device, echo=echo
    )
    world = distributed.world()  # under torchrun: rank 0 decides, locks and writes (see fkd.distributed)

    def decide() -> RunStart:
        start = decide_start(run, kind="teacher_run", config_text=dumps(cfg), resume=resume,
                             num_examples=len(data.train), batch_size=cfg.data.batch_size, label="teacher")
        _check_may_replace(ckpt_path, start, overwrite)
        return start

    with distributed.on_main(lambda: RunLock(run.path)):
        start = world.from_main(decide)
        if announce:
            echo(start_lines.teacher_start(cfg, checkpoint=ckpt_path, num_images=len(data.train), run_path=run.path,
                                           device=device, done_epochs=start.epoch))
        trainable, frozen = _split_trainable(model, params, t.mode)
        training = build_training(
            model, from_weights({"ce": 1.0}), t.train, params=trainable, buffers=buffers, frozen=frozen,
            train_mode=t.mode != "linear_probe",
            steps_per_epoch=steps_per_epoch(len(data.train), cfg.data.batch_size),
            batch_size=cfg.data.batch_size, seed=cfg.seed, augment=augments(cfg.data), device=device,
            label="teacher", optimizer_key="teacher.train.optimizer", quiet=quiet)
        start.check_state(training.state)
        run_log = open_run_log(cfg.log, run.path, config_text=dumps(cfg), name=cfg.name) if world.is_main else None
        if world.is_main:
            _check_writable(ckpt_path)
            start.begin(echo=echo)
            run.write_config(cfg)

        def weights_of(st: dict) -> dict:
            return {**st["frozen"], **st["params"]["model"]}

        evaluate = make_evaluator(model, data.test, lambda st: (weights_of(st), st["buffers"]),
                                  batch_size=cfg.data.eval_batch_size, num_classes=data.num_classes, device=device,
                                  compile=t.train.compile)

        try:
            state = fit(start, spec=training.spec, step=training.step, state=training.state, source=data.train,
                        device=device, evaluate=lambda st: evaluate(st)["accuracy"],
                        learning_rate=training.learning_rate, extra_payload=lambda st: {"model": dict(model.spec)},
                        sink=run_log.sink() if run_log else None)
        finally:
            if run_log is not None:
                run_log.close()
        final = evaluate(state)
        if world.is_main:
            save_teacher(ckpt_path, cfg, model, weights_of(state), state["buffers"], final["accuracy"])
        summary = {
            "kind": "teacher",
            "arch": t.arch,
            "mode": t.mode,
            "teacher_test_acc": final["accuracy"],
            "per_class_acc": final["per_class"],
            "params": param_count(weights_of(state)),
            "size_bytes": size_bytes(weights_of(state), state["buffers"]),
            "checkpoint": str(ckpt_path),
        }
        if world.is_main:
            run.write_summary(summary)
            plot_curves(run.read_metrics(), run.curves_path, titles.run_title(cfg, run.path, role="teacher"))
    world.barrier()  # the checkpoint is written before any rank goes on to read it (a distill fitting its teacher)
    if world.is_main:
        echo(f"teacher {t.arch} ({t.mode}): test accuracy {final['accuracy']:.2%}; checkpoint {ckpt_path}")
    return summary


def _check_may_replace(path: Path, start: RunStart, overwrite: bool) -> None:
    """Refuse to replace an existing teacher checkpoint unless asked to, or unless the run being resumed
    wrote it (its saved config is this run's, epoch counts aside)."""
    if overwrite or not path.exists():
        return
    if start.saved is not None:
        try:
            written_with = load_checkpoint(path, "teacher", mmap=True).get("config", "")
        except CheckpointError:
            written_with = None
        if written_with is not None and config_key(written_with) == config_key(start.config_text):
            return
    raise CheckpointError(
        f"the teacher checkpoint '{path}' already exists; pass --overwrite to replace it, or set "
        "teacher.checkpoint to a new file (--resume continues the run that wrote it)."
    )


def _check_writable(path: Path) -> None:
    """Fail before training when the teacher checkpoint cannot be written."""
    ensure_writable(path.parent, what="the teacher checkpoint's folder", fix="set teacher.checkpoint elsewhere")


def save_teacher(path: Path, cfg: Config, model: Model, params: dict, buffers: dict, test_acc: float) -> None:
    """Write a teacher checkpoint (tensors on the CPU)."""
    save_checkpoint(path, {
        "model": dict(model.spec),
        "params": {k: v.detach().cpu() for k, v in params.items()},
        "buffers": {k: v.detach().cpu() for k, v in buffers.items()},
        "test_acc": float(test_acc),
        "config": dumps(cfg),
    }, kind="teacher")


def save_student_as_teacher(run: RunDir, path: Path) -> Path:
    """Write the trained student of the finished distill run ``run`` as a teacher checkpoint at ``path``.

    The teacher checkpoint holds the student's model spec, its final weights (``checkpoints/latest.pt``),
    the test accuracy its ``summary.json`` records and the run's config, so :func:`load_teacher` reads it
    as any fitted teacher: a later stage of a pipeline learns from it (:mod:`fkd.stages`), and ``fkd
    evaluate`` / ``fkd export --teacher`` take it. Returns ``path``.
    """
    saved = load_checkpoint(run.latest, "student_run")
    try:
        accuracy = float(json.loads(run.summary_path.read_text())["student_test_acc"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"'{run.summary_path}' does not record the student's test accuracy; the run in "
                              f"'{run.path}' has not finished: run it to the end first.") from None
    state = saved["state"]
    save_checkpoint(path, {
        "model": dict(saved["model"]),
        "params": {**state["frozen"], **state["params"]["model"]},
        "buffers": dict(state["buffers"]),
        "test_acc": accuracy,
        "config": saved["config"],
    }, kind="teacher")
    return path


def load_teacher(path: Path, cfg: Config, num_classes: int, feature_names=(), device="cpu"):
    """Load a teacher checkpoint for ``cfg`` -> ``(model, {"params", "buffers"}, test_acc)``.

    The checkpoint must match ``teacher.arch`` and the data set's class count; otherwise a
    :class:`CheckpointError` says which and how to fix it. ``teacher.weights``' file as the teacher
    (:func:`weights_as_teacher`) is read as a state dict for ``teacher.arch``, its head included (its test
    accuracy is then unknown: NaN).
    """
    if weights_as_teacher(cfg) == path:
        model, params, buffers = build_teacher(cfg, num_classes, feature_names, weights=str(path), new_head=None)
        return model, {"params": {k: v.to(device) for k, v in params.items()},
                       "buffers": {k: v.to(device) for k, v in buffers.items()}}, float("nan")
    data = load_checkpoint(path, "teacher")
    spec = data["model"]
    if spec["arch"] != cfg.teacher.arch:
        raise CheckpointError(
            f"teacher checkpoint '{path}' is a {spec['arch']}, but teacher.arch is '{cfg.teacher.arch}'; "
            "set teacher.arch to match or fit a new teacher."
        )
    if spec["num_classes"] != num_classes:
        raise CheckpointError(
            f"teacher checkpoint '{path}' predicts {spec['num_classes']} classes, but data set "
            f"'{cfg.data.name}' has {num_classes}; use a teacher fitted on this data set."
        )
    # Built from the config, so a checkpoint of another shape (widths, image size) is caught below.
    model, params, buffers = build_teacher(cfg, num_classes, feature_names)
    if set(params) != set(data["params"]) or set(buffers) != set(data["buffers"]):
        raise CheckpointError(f"teacher checkpoint '{path}' does not fit a {spec['arch']} (its weights differ); "
                              "fit the teacher again.")
    for name, tensor in data["params"].items():
        if tensor.shape != params[name].shape:
            raise CheckpointError(
                f"teacher checkpoint '{path}': weight '{name}' has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(params[name].shape)}; fit the teacher again for this config."
            )
    variables = {
        "params": {k: v.to(device) for k, v in data["params"].items()},
        "buffers": {k: v.to(device) for k, v in data["buffers"].items()},
    }
    return model, variables, float(data.get("test_acc", float("nan")))
