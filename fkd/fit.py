"""Fit a train state to a data source inside a run directory: resume, checkpoints, metrics.

:func:`fit` is what the teacher fit and distillation share. It runs :func:`fkd.loop.run_epochs` and
writes ``checkpoints/latest.pt`` (the whole train state, the position in the data, the RNG state) and
``metrics.jsonl``. With ``resume=True`` it continues from ``latest.pt``; without it, an existing
checkpoint is never overwritten (the user is told to pass ``--resume`` or another ``--out``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from fkd.checkpoint import load_checkpoint, save_checkpoint
from fkd.errors import CheckpointError, FkdError
from fkd.loop import LoopSpec, run_epochs
from fkd.pytree import tree_map, tree_signature, tree_to
from fkd.rundir import RunDir


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
    run: RunDir,
    *,
    kind: str,
    spec: LoopSpec,
    step: Callable,
    state: dict,
    source,
    device: torch.device,
    resume: bool,
    config_text: str,
    extra_payload: Callable[[dict], dict] | None = None,
    **loop_kwargs: Any,
) -> dict:
    """Train ``state`` for ``spec.epochs`` epochs (or what is left of them) and return it.

    Args:
        kind: checkpoint kind, ``"teacher_run"`` or ``"student_run"``.
        config_text: the resolved config; a resumed run must have been started with the same one
            (except ``train.epochs`` / ``teacher.train.epochs``, which may grow).
        extra_payload: ``state -> dict`` of extra checkpoint entries (e.g. the model spec).
        loop_kwargs: passed to :func:`fkd.loop.run_epochs` (evaluate, batch_extras, teacher_vars, ...).
    """
    start_epoch, start_batch = 0, 0
    if run.latest.exists():
        if not resume:
            raise FkdError(
                f"'{run.path}' already holds a run (checkpoints/latest.pt); pass --resume to continue it "
                "or --out DIR to start a new one."
            )
        saved = load_checkpoint(run.latest, kind)
        if saved.get("config_key") != _config_key(config_text):
            raise CheckpointError(
                f"the run in '{run.path}' was started with a different config; resume it with its own "
                f"config ({run.config_path}) or start a new run with --out."
            )
        _check_same_structure(saved["state"], state, run)
        state = tree_to(saved["state"], device)
        start_epoch, start_batch = int(saved["epoch"]), int(saved["batch"])
        _set_rng_state(saved["rng"])
        run.truncate_metrics(start_epoch)
        if start_epoch >= spec.epochs:
            return state
    elif resume:
        raise FkdError(f"nothing to resume in '{run.path}' (no checkpoints/latest.pt); run without --resume.")

    def save(st: dict, epoch: int, batch: int) -> None:
        payload = {
            "state": tree_map(lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, st),
            "epoch": epoch,
            "batch": batch,
            "rng": _rng_state(),
            "config": config_text,
            "config_key": _config_key(config_text),
        }
        if extra_payload is not None:
            payload.update(extra_payload(st))
        save_checkpoint(run.latest, payload, kind)

    return run_epochs(
        step, state, source, spec, save=save, on_epoch=run.append_metrics,
        start_epoch=start_epoch, start_batch=start_batch, **loop_kwargs,
    )


def _config_key(config_text: str) -> str:
    """The config with the epoch counts removed: what must match for a resume."""
    lines = [line for line in config_text.splitlines() if not line.startswith("epochs = ")]
    return "\n".join(lines)


def _check_same_structure(saved: dict, fresh: dict, run: RunDir) -> None:
    """A checkpoint's state must have the fresh state's leaves, shapes and dtypes (else the step would fail)."""
    have, want = tree_signature(saved), tree_signature(fresh)
    if have.keys() != want.keys():
        diff = sorted(set(have) ^ set(want))
        raise CheckpointError(
            f"the checkpoint in '{run.path}' holds a train state of another layout (e.g. '{diff[0]}'), written "
            "by another fkd version or objective; start a new run with --out."
        )
    for path, sig in want.items():
        if have[path] != sig:
            raise CheckpointError(f"the checkpoint in '{run.path}' holds '{path}' as {have[path]}, but this run "
                                  f"needs {sig}; start a new run with --out.")

