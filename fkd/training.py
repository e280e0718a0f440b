"""Glue shared by the teacher fit and distillation: devices, optimizers from configs, evaluation.

Nothing here is pure math (that is :mod:`fkd.losses`, :mod:`fkd.optim`, :mod:`fkd.step`); these are
the small decisions a run makes once, before its loop starts.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fkd import optim, schedules
from fkd.config import OptimizerConfig
from fkd.errors import ConfigError
from fkd.step import make_eval_step


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when present, else cpu; an unavailable CUDA device is a :class:`ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for but CUDA is not available here; use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N.")
    return device


def learning_rate_schedule(cfg: OptimizerConfig, steps_per_epoch: int, epochs: int) -> schedules.Schedule:
    """The config's schedule over ``epochs * steps_per_epoch`` optimizer steps."""
    total = max(steps_per_epoch * epochs, 1)
    lr = cfg.learning_rate
    if cfg.schedule == "constant":
        return schedules.constant(lr)
    if cfg.schedule == "cosine":
        return schedules.cosine_decay(lr, total)
    if cfg.schedule == "warmup_cosine":
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        if warmup >= total:
            raise ConfigError(
                f"optimizer.warmup_epochs = {cfg.warmup_epochs} covers the whole run of {epochs} epochs; lower it."
            )
        return schedules.warmup_cosine(lr, warmup, total)
    if cfg.schedule == "multistep":
        return schedules.multistep(lr, [m * steps_per_epoch for m in cfg.milestones], cfg.gamma)
    if cfg.schedule == "one_cycle":
        return schedules.one_cycle(lr, max(total, 2))
    raise ConfigError(f"unknown schedule '{cfg.schedule}'.")


def optimizer_from_config(
    cfg: OptimizerConfig, steps_per_epoch: int, epochs: int
) -> tuple[optim.GradientTransformation, schedules.Schedule]:
    """``(optimizer, schedule)`` for a config; gradient clipping is chained first when ``clip_norm > 0``."""
    lr = learning_rate_schedule(cfg, steps_per_epoch, epochs)
    if cfg.name == "sgd":
        opt = optim.sgd(lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    elif cfg.name == "adam":
        opt = optim.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    else:
        opt = optim.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.clip_norm > 0:
        opt = optim.chain(optim.clip_by_global_norm(cfg.clip_norm), opt)
    return opt, lr


def current_lr(schedule: schedules.Schedule, state: dict) -> float:
    """The learning rate the next step will use (a host sync: call it at epoch ends only)."""
    return float(schedule(state["step"].cpu()))


def evaluate_model(model, params: dict, buffers: dict, source, *, batch_size: int, num_classes: int,
                   device: torch.device, precision: str = "fp32") -> dict:
    """Accuracy over a whole split: ``{"accuracy", "per_class", "correct", "count"}``.

    ``per_class`` is a list of per-class accuracies (None for classes with no test images).
    """
    eval_step = make_eval_step(model, precision=precision, device=device)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for x, y, _ in source.batches(batch_size, shuffle=False):
        logits = eval_step(params, buffers, x, y)["logits"]
        pred = logits.argmax(dim=-1)
        confusion += torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes).view(
            num_classes, num_classes
        )
    confusion = confusion.cpu().numpy()
    per_class_total = confusion.sum(axis=1)
    correct = int(np.trace(confusion))
    count = int(confusion.sum())
    per_class = [
        float(confusion[i, i] / per_class_total[i]) if per_class_total[i] else None for i in range(num_classes)
    ]
    return {"accuracy": correct / max(count, 1), "per_class": per_class, "correct": correct, "count": count}


def make_evaluator(model, source, weights_of, *, batch_size: int, num_classes: int, device: torch.device):
    """``evaluate(state) -> evaluate_model(...)`` result for the weights ``weights_of(state) -> (params, buffers)``.

    The last result is remembered for the state object it was computed for, so the end-of-run summary
    reuses the final epoch's evaluation instead of running the test set again.
    """
    last: dict = {}

    def evaluate(state: dict) -> dict:
        if last.get("state") is not state:
            params, buffers = weights_of(state)
            result = evaluate_model(model, params, buffers, source, batch_size=batch_size,
                                    num_classes=num_classes, device=device)
            last.update(state=state, result=result)
        return last["result"]

    return evaluate


def cpu_latency_ms(model, params: dict, buffers: dict, image_size: int, *, repeats: int = 20) -> float:
    """Median CPU latency of one image (batch 1, eval mode, fp32), in milliseconds."""
    cpu = torch.device("cpu")
    p = {k: v.to(cpu) for k, v in params.items()}
    b = {k: v.to(cpu) for k, v in buffers.items()}
    x = torch.zeros(1, 3, image_size, image_size)
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            model.apply(p, b, x, train=False)
            if i >= 3:
                times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)
