"""Fit a train state to a data source inside a run directory: resume, checkpoints, metrics.

:func:`fit` is what the teacher fit and distillation share. It runs :func:`fkd.loop.run_epochs` from
where a :class:`~fkd.run_start.RunStart` says (fresh, or the position in its checkpoint) and writes
``checkpoints/latest.pt`` (the whole train state, the position in the data, the RNG state) and
``metrics.jsonl``. Whether the run may start at all -- an existing checkpoint without ``--resume``, a
resume with another config -- is decided before, by :func:`fkd.run_start.decide_start`, so that a
refused command writes nothing.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from fkd import distributed
from fkd.checkpoint import save_checkpoint
from fkd.loop import LoopSpec, run_epochs
from fkd.pytree import tree_map, tree_to
from fkd.run_start import RunStart, config_key


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fit(
    start: RunStart,
    *,
    spec: LoopSpec,
    step: Callable,
    state: dict,
    source,
    device: torch.device,
    extra_payload: Callable[[dict], dict] | None = None,
    **loop_kwargs: Any,
) -> dict:
    """Train ``state`` for ``spec.epochs`` epochs (or what is left of them) and return it.

    Args:
        start: the decided start (:func:`fkd.run_start.decide_start`, after :meth:`RunStart.begin`):
            its checkpoint, when resuming, replaces ``state``; its kind and config go into every checkpoint.
        extra_payload: ``state -> dict`` of extra checkpoint entries (e.g. the model spec).
        loop_kwargs: passed to :func:`fkd.loop.run_epochs` (evaluate, batch_extras, teacher_vars, ...).
    """
    run = start.run
    if start.saved is not None:
        state = tree_to(start.saved["state"], device)
        _set_rng_state(start.saved["rng"])
        if start.epoch >= spec.epochs:
            return state

    main = distributed.is_main()  # under torchrun only rank 0 writes; the states are identical

    def save(st: dict, epoch: int, batch: int) -> None:
        if not main:
            return
        payload = {
            "state": tree_map(lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, st),
            "epoch": epoch,
            "batch": batch,
            "rng": _rng_state(),
            "config": start.config_text,
            "config_key": config_key(start.config_text),
        }
        if extra_payload is not None:
            payload.update(extra_payload(st))
        save_checkpoint(run.latest, payload, start.kind)

    return run_epochs(
        step, state, source, spec, save=save, on_epoch=run.append_metrics if main else None,
        start_epoch=start.epoch, start_batch=start.batch, **loop_kwargs,
    )
