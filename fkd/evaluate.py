"""Evaluation: accuracy over a split, CPU latency, and ``fkd evaluate PATH`` for a saved model.

:func:`evaluate_model` is the test pass of every run (teacher fit and distillation call it through
:func:`make_evaluator` at each epoch end). ``fkd evaluate PATH`` reports accuracy, per-class accuracy,
size and CPU latency of a trained model: PATH is a run directory (its ``checkpoints/latest.pt`` and
``config.toml``; for a teacher run, its ``teacher.pt`` when present) or a checkpoint file (teacher or
student; the config inside it says which data to evaluate on).
"""

from __future__ import annotations

import itertools
import json
import tomllib
from pathlib import Path

import numpy as np
import torch

from fkd import distributed, latency
from fkd.checkpoint import load_checkpoint
from fkd.data.order import batch_count
from fkd.config import apply_overrides, from_dict, read_toml
from fkd.data import load_data
from fkd.errors import CheckpointError, DataError
from fkd.models.cohort import Cohort
from fkd.models import build_model, head_prefix, param_count, size_bytes
from fkd.rundir import ensure_writable, write_text_atomic
from fkd.step import float32_math, make_eval_step, should_compile


def evaluate_model(model, params: dict, buffers: dict, source, *, batch_size: int, num_classes: int,
                   device: torch.device, precision: str = "fp32", shard: bool = True, compile: bool | str = "off",
                   eval_step=None) -> dict:
    """Accuracy over a whole split: ``{"accuracy", "per_class", "correct", "count"}``.

    ``per_class`` is a list of per-class accuracies (None for classes with no test images). For a
    :class:`~fkd.models.cohort.Cohort` each member is evaluated alone: ``members`` holds their accuracies
    and the other figures are the members' means (counts: sums).

    The confusion matrix is summed on the device (``index_add_``, no host sync per batch) and read once.
    ``compile`` (``train.compile``: "auto" compiles on CUDA) runs the eval step under ``torch.compile``; every
    batch then has ``batch_size`` rows -- the last one is padded with label -1, which counts nowhere -- so
    one compiled shape serves the whole split. ``eval_step``: a step from :func:`make_eval_step` to reuse
    (:func:`make_evaluator` builds one per run).

    Under torchrun each rank evaluates a contiguous block of the batches and the confusion counts are
    summed over ranks, so every rank returns the single-process result (``shard=False``: this rank
    evaluates everything alone, as a sweep does for the students it trains).
    """
    if isinstance(model, Cohort):  # each member on its own; the cohort's figures are their means
        results = {n: evaluate_model(model.member(n), params[n], buffers[n], source, batch_size=batch_size,
                                     num_classes=num_classes, device=device, precision=precision, shard=shard,
                                     compile=compile)
                   for n in model.names}
        per_class = [[r["per_class"][c] for r in results.values()] for c in range(num_classes)]
        return {"accuracy": sum(r["accuracy"] for r in results.values()) / len(results),
                "per_class": [None if None in v else sum(v) / len(v) for v in per_class],
                "correct": sum(r["correct"] for r in results.values()), "count": sum(r["count"] for r in results.values()),
                "members": {n: r["accuracy"] for n, r in results.items()}}
    if eval_step is None:
        eval_step = make_eval_step(model, precision=precision, device=device, compile=compile)
    pad = should_compile(compile, torch.device(device).type)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    world = distributed.world() if shard else distributed.World()
    batches = source.batches(batch_size, shuffle=False)
    if world.parallel:
        first, last = world.part(batch_count(len(source), batch_size))
        batches = itertools.islice(source.batches(batch_size, shuffle=False, start=first), last - first)
    with float32_math(precision, device):
        for x, y, _ in batches:
            if pad and x.shape[0] < batch_size:
                x, y = padded_batch(x, y, batch_size)
            pred = eval_step(params, buffers, x, y)["logits"].argmax(dim=-1)
            labeled = y >= 0
            confusion.index_add_(0, y.clamp(min=0) * num_classes + pred, labeled.to(torch.int64))
    confusion = world.sum(confusion.view(num_classes, num_classes)).cpu().numpy()
    per_class_total = confusion.sum(axis=1)
    correct = int(np.trace(confusion))
    count = int(confusion.sum())
    per_class = [
        float(confusion[i, i] / per_class_total[i]) if per_class_total[i] else None for i in range(num_classes)
    ]
    return {"accuracy": correct / max(count, 1), "per_class": per_class, "correct": correct, "count": count}


def padded_batch(x: torch.Tensor, y: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (B, ...) and ``y`` (B,) grown to ``rows`` rows: zero images labelled -1 (counted nowhere)."""
    extra = rows - x.shape[0]
    x = torch.cat([x, x.new_zeros((extra, *x.shape[1:]))])
    return x, torch.cat([y, y.new_full((extra,), -1)])


def make_evaluator(model, source, weights_of, *, batch_size: int, num_classes: int, device: torch.device,
                   compile: bool | str = "off", precision: str = "fp32"):
    """``evaluate(state) -> evaluate_model(...)`` result for the weights ``weights_of(state) -> (params, buffers)``.

    The eval step is built (and, with ``compile``, compiled) once for the run. The last result is
    remembered for the state object it was computed for, so the end-of-run summary reuses the final
    epoch's evaluation instead of running the test set again.
    """
    last: dict = {}
    step = None if isinstance(model, Cohort) else make_eval_step(model, precision=precision, device=device,
                                                                  compile=compile)

    def evaluate(state: dict) -> dict:
        if last.get("state") is not state:
            params, buffers = weights_of(state)
            result = evaluate_model(model, params, buffers, source, batch_size=batch_size,
                                    num_classes=num_classes, device=device, compile=compile, precision=precision,
                                    eval_step=step)
            last.update(state=state, result=result)
        return last["result"]

    return evaluate


def cpu_latency(model, params: dict, buffers: dict, image_size: int, *, threads: int = latency.DEFAULT_THREADS,
                batch_size: int = 1, repeats: int = latency.DEFAULT_REPEATS) -> dict:
    """CPU latency per image of ``model`` (eval mode, fp32) on (``batch_size``, 3, S, S) zeros with
    ``threads`` torch threads: a :func:`fkd.latency.measure` dict (``ms_per_image``, ``text``, ...)."""
    cpu = torch.device("cpu")
    p = {k: v.to(cpu) for k, v in params.items()}
    b = {k: v.to(cpu) for k, v in buffers.items()}
    x = torch.zeros(batch_size, 3, image_size, image_size)
    return latency.measure(lambda batch: model.apply(p, b, batch, train=False), x, threads=threads, repeats=repeats)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a run directory or file path."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "teacher.pt", path / "checkpoints" / "latest.pt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"'{path}' holds no checkpoint (checkpoints/latest.pt or teacher.pt); "
                              "pass a run directory written by fkd or a checkpoint file.")
    if not path.exists():
        raise CheckpointError(f"'{path}' does not exist; pass a run directory or a checkpoint file.")
    return path


def _weights(data: dict) -> tuple[dict, dict]:
    if "cohort" in data.get("model", {}):
        raise CheckpointError("this run trained a cohort of students; evaluate or export one member's own "
                              "checkpoint: <run>/members/<name>.pt.")
    if data["kind"] == "teacher":
        return data["params"], data["buffers"]
    state = data["state"]
    return {**state["frozen"], **state["params"]["model"]}, state["buffers"]


def _model_spec(data: dict, params: dict) -> dict:
    """What the saved model is: its ``model`` entry, or -- in a teacher run's ``latest.pt`` from before
    those had one -- the teacher of the config it was trained with, its class count read off its head."""
    if "model" in data:
        return dict(data["model"])
    saved = from_dict(tomllib.loads(data["config"]))  # parsed only: it ran, so it was valid
    t = saved.teacher
    spec = {"arch": t.arch, "num_classes": 1, "image_size": saved.data.image_size, **t.options}
    probe, _, _ = _build(spec)
    spec["num_classes"] = int(params[head_prefix(probe.eval_template) + ".weight"].shape[0])
    return spec


def saved_model(ckpt: Path, data: dict):
    """The model that ``data``, the loaded model checkpoint ``ckpt`` (teacher, teacher run or student run),
    holds as it was trained: ``(model, params, buffers)`` with the saved weights. Weights that do not fit
    the model are a CheckpointError (:func:`check_fits`)."""
    params, buffers = _weights(data)
    built = _build(_model_spec(data, params))
    model = built[0]
    check_fits(ckpt, built, params, buffers, num_classes=model.num_classes, data_name="",
               image_size=model.image_size)
    return model, params, buffers


def _build(spec: dict):
    options = {k: v for k, v in spec.items() if k not in ("arch", "num_classes", "image_size")}
    return build_model(spec["arch"], spec["num_classes"], spec["image_size"], **options)


def check_fits(ckpt: Path, built: tuple, params: dict, buffers: dict, *, num_classes: int, data_name: str,
               image_size: int) -> None:
    """Refuse data the saved model cannot be evaluated on, before a batch runs, saying what differs.

    ``built`` is ``(model, params, buffers)`` from :func:`fkd.models.build_model` as the model was trained;
    ``params`` / ``buffers`` are the saved weights; ``num_classes`` and ``image_size`` describe the data.
    Saved weights of other shapes are a CheckpointError. A different class count is a DataError (the
    labels would mean other things); a different image size only when the model cannot take it (a
    classifier sized for its input), found by a forward pass on the meta device, which computes shapes only.
    """
    model, want_params, want_buffers = built
    mismatch = next(_weight_mismatches(params, buffers, want_params, want_buffers), None)
    if mismatch is not None:
        name, have, want = mismatch
        raise CheckpointError(f"'{ckpt}' does not fit the {model.arch} its config describes (weight '{name}' is "
                              f"{have}, the model has {want}); use the fkd version that wrote it, or train it again.")
    if model.num_classes != num_classes:
        raise DataError(f"'{ckpt}' holds a {model.arch} that predicts {model.num_classes} classes, but data set "
                        f"'{data_name}' has {num_classes}; evaluate it on the data it was trained on (drop "
                        "--config / --set, or set data.* as in its config).")
    if image_size != model.image_size:
        meta = lambda tree: {k: torch.empty_like(v, device="meta") for k, v in tree.items()}  # noqa: E731
        try:
            model.apply(meta(params), meta(buffers), torch.empty(1, 3, image_size, image_size, device="meta"),
                        train=False)
        except RuntimeError:
            raise DataError(f"'{ckpt}' holds a {model.arch} trained on {model.image_size} px images, which cannot "
                            f"take data.image_size = {image_size}; evaluate with --set data.image_size="
                            f"{model.image_size}.") from None


def _weight_mismatches(params: dict, buffers: dict, want_params: dict, want_buffers: dict):
    """``(name, saved shape, model's shape)`` for every weight that differs ("missing" on either side)."""
    for have, want in ((params, want_params), (buffers, want_buffers)):
        for name in sorted(set(have) | set(want)):
            a = tuple(have[name].shape) if name in have else "missing"
            b = tuple(want[name].shape) if name in want else "missing"
            if a != b:
                yield name, a, b


def evaluate_path(path: str | Path, device: torch.device, *, config_path: str | Path | None = None,
                  overrides: list[str] = (), threads: int = latency.DEFAULT_THREADS) -> dict:
    """Evaluate the model saved at ``path`` on the test split of its config.

    ``threads``: torch threads for the CPU latency figure (batch 1; ``cpu_latency`` holds its
    :func:`fkd.latency.measure` dict, ``cpu_latency_ms`` its number).

    The config is the one saved in the checkpoint, or ``config_path``; ``overrides`` (``key=value``)
    apply on top, e.g. ``data.root=...`` when the data moved. Data the model cannot take (another class
    count, an image size its classifier was not sized for) is refused up front (:func:`check_fits`).
    """
    ckpt = resolve_checkpoint(path)
    data = load_checkpoint(ckpt)
    if data.get("kind") not in ("teacher", "student_run", "teacher_run"):
        raise CheckpointError(f"'{ckpt}' is a {data.get('kind')} file, not a model checkpoint.")
    raw = read_toml(config_path) if config_path is not None else tomllib.loads(data["config"])
    cfg = from_dict(apply_overrides(raw, list(overrides)))
    params, buffers = _weights(data)
    spec = _model_spec(data, params)
    built = _build(spec)  # as it was trained: its own class count and image size
    bundle = load_data(cfg.data, device=device)
    check_fits(ckpt, built, params, buffers, num_classes=bundle.num_classes, data_name=cfg.data.name,
               image_size=cfg.data.image_size)
    model = built[0]
    num_classes = spec["num_classes"]
    params = {k: v.to(device) for k, v in params.items()}
    buffers = {k: v.to(device) for k, v in buffers.items()}
    result = evaluate_model(model, params, buffers, bundle.test, batch_size=cfg.data.eval_batch_size,
                            num_classes=num_classes, device=device)
    return {
        "checkpoint": str(ckpt),
        "arch": spec["arch"],
        "data": cfg.data.name,
        "test_acc": result["accuracy"],
        "per_class_acc": dict(zip(bundle.class_names, result["per_class"])),
        "test_images": result["count"],
        "params": param_count(params),
        "size_bytes": size_bytes(params, buffers),
        **latency_entries(cpu_latency(model, params, buffers, cfg.data.image_size, threads=threads)),
    }


def latency_entries(fig: dict, prefix: str = "") -> dict:
    """``{prefix + "cpu_latency_ms": number, prefix + "cpu_latency": the figure}`` for a report or summary."""
    return {f"{prefix}cpu_latency_ms": fig["ms_per_image"], f"{prefix}cpu_latency": fig}


def write_report(result: dict, out: str | Path) -> Path:
    """Write an evaluation report to ``out/evaluation.json`` (atomically); returns its path."""
    out = Path(out)
    ensure_writable(out, what="the report folder", fix="pick another with --out")
    path = out / "evaluation.json"
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    return path
