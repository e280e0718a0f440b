"""The epoch loop shared by ``fkd teacher`` and ``fkd distill``.

It drives a pure ``step(state, batch, teacher_vars) -> (state, metrics)`` over a data source and owns
everything impure around it: progress, host syncs (only every ``log_every`` steps and at epoch ends),
the non-finite check, checkpoints, and Ctrl-C / SIGTERM.

Under torchrun (see :mod:`fkd.distributed`) each rank takes its slice of every global batch, only rank 0
shows progress, and a signal is acted on at the next sync point, where the ranks agree on it (one small
all-reduce), so every rank stops after the same step and rank 0 writes the one checkpoint.

Resumption is exact: the data order and augmentation are functions of (seed, epoch, batch) (see
:mod:`fkd.data.order`), the train state is saved whole, and the global RNG state travels with it, so
a run interrupted at any step and resumed ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import signal
import time
from typing import Any, Callable

import attrs
import torch

from fkd import distributed
from fkd.data.order import batch_count
from fkd.errors import TrainingError
from fkd.progress import Progress


class Interrupted(Exception):
    """Training stopped on SIGINT / SIGTERM after saving a checkpoint."""

    def __init__(self, signum: int, epoch: int, batch: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at epoch {epoch + 1}, step {batch}")
        self.signum, self.epoch, self.batch = signum, epoch, batch


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag the loop checks between steps (handlers restored on exit)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def should_stop(stop: StopRequest, world: distributed.World, sync: bool) -> bool:
    """Whether to stop after this step: at once on a signal in a single process; under torchrun when a
    signal reached any rank, agreed at a sync point (``sync``) so that every rank stops after the same step."""
    if not world.parallel:
        return stop.signum is not None
    return sync and world.any(stop.signum is not None)


@attrs.frozen
class LoopSpec:
    """What the loop needs to know besides the step."""

    label: str  # "teacher" or "student", for messages
    epochs: int
    batch_size: int
    seed: int
    augment: bool
    log_every: int = 50
    checkpoint_every: int = 0
    quiet: bool = False


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped so the compiled step sees one shape)."""
    return batch_count(num_examples, batch_size, drop_last=True)


def run_epochs(
    step: Callable,
    state: dict,
    source,
    spec: LoopSpec,
    *,
    teacher_vars: dict | None = None,
    batch_extras: Callable[[torch.Tensor], dict] | None = None,
    evaluate: Callable[[dict], float] | None = None,
    learning_rate: Callable[[dict], float] | None = None,
    save: Callable[[dict, int, int], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    start_epoch: int = 0,
    start_batch: int = 0,
) -> dict:
    """Train from ``(start_epoch, start_batch)`` to the end; returns the final state.

    Args:
        batch_extras: ``idx -> {...}`` merged into each batch (cached teacher outputs).
        evaluate: ``state -> test accuracy`` at each epoch end.
        learning_rate: ``state -> lr`` for the metrics.
        save: ``save(state, epoch, batch)`` writes a checkpoint from which training resumes at
            ``(epoch, batch)``; called at epoch ends, every ``checkpoint_every`` steps, and on a signal.
        on_epoch: receives each epoch's metrics record (for metrics.jsonl).

    Raises:
        TrainingError: the loss or gradients became non-finite (the last checkpoint is left as it was).
        Interrupted: SIGINT / SIGTERM; a checkpoint was written first.
    """
    nb = steps_per_epoch(len(source), spec.batch_size)
    if nb == 0:
        raise TrainingError(
            f"the {spec.label} training set has {len(source)} images, fewer than one batch of "
            f"{spec.batch_size}; lower data.batch_size."
        )
    run_start = time.perf_counter()
    world = distributed.world()
    with StopRequest() as stop:
        for epoch in range(start_epoch, spec.epochs):
            first = start_batch if epoch == start_epoch else 0
            progress = None if spec.quiet or not world.is_main else Progress(
                nb, f"{spec.label} epoch {epoch + 1}/{spec.epochs}" + (f" ({world.size} processes)" if world.parallel
                                                                       else ""))
            sums: dict[str, torch.Tensor] = {}
            done, images, t0, stopping = first, 0, time.perf_counter(), False
            batches = source.batches(spec.batch_size, shuffle=True, epoch=epoch, seed=spec.seed, start=first,
                                     augment=spec.augment, drop_last=True)
            for x, y, idx in batches:
                if world.parallel:  # this rank's share of the global batch (see fkd.data_parallel)
                    mine = world.interleaved()
                    x, y, idx = x[mine], y[mine], idx[mine]
                batch = {"x": x, "y": y, "idx": idx}
                if batch_extras is not None:
                    batch.update(batch_extras(idx))
                state, metrics = step(state, batch, teacher_vars)
                sums = _accumulate(sums, metrics)
                done += 1
                images += spec.batch_size if world.parallel else y.shape[0]
                sync = done % spec.log_every == 0 or done == nb
                if sync:
                    _check_finite(state, spec, nb)
                    if progress is not None:
                        progress.update(done, loss=_mean(sums, "loss"), **{"img/s": images / (time.perf_counter() - t0)})
                if spec.checkpoint_every and done % spec.checkpoint_every == 0 and done < nb and save:
                    _check_finite(state, spec, nb)
                    save(state, epoch, done)
                stopping = should_stop(stop, world, sync)
                if stopping and done < nb:
                    _check_finite(state, spec, nb)
                    if save:
                        save(state, epoch, done)
                    raise Interrupted(stop.signum or signal.SIGTERM, epoch, done)
                # at the epoch's last step: its record and checkpoint first, then the stop (below)
            if progress is not None:
                progress.close()
            _check_finite(state, spec, nb)
            seconds = time.perf_counter() - t0
            record = {
                "epoch": epoch + 1,
                "train_loss": _mean(sums, "loss"),
                **{f"train_{k}": _mean(sums, k) for k in sums if k not in _NOT_LOSSES},
                "train_acc": float(sums["correct"]) / max(float(sums["count"]), 1.0),
                "test_acc": evaluate(state) if evaluate else None,
                "images_per_s": images / seconds if seconds > 0 else None,
                "lr": learning_rate(state) if learning_rate else None,
                "epoch_seconds": seconds,
                "wall_seconds": time.perf_counter() - run_start,
            }
            if first:
                record["resumed_at_step"] = first
            # The record first: a crash between the two leaves a record the checkpoint has not reached,
            # which a resume drops and writes again, never a finished epoch without its record.
            if on_epoch:
                on_epoch(record)
            if save:
                save(state, epoch + 1, 0)
            if stopping and epoch + 1 < spec.epochs:  # after the last epoch the run is complete anyway
                raise Interrupted(stop.signum or signal.SIGTERM, epoch, done)
    return state


_NOT_LOSSES = ("loss", "correct", "count", "finite", "grad_norm", "steps")


def _accumulate(sums: dict, metrics: dict) -> dict:
    add = {k: v.detach() for k, v in metrics.items() if k != "finite"}
    add["steps"] = torch.ones((), dtype=torch.int64)
    if not sums:
        return add
    return {k: sums[k] + v for k, v in add.items()}


def _mean(sums: dict, key: str) -> float:
    return float(sums[key]) / max(int(sums["steps"]), 1) if key in sums else float("nan")


def _check_finite(state: dict, spec: LoopSpec, steps_per_epoch_: int) -> None:
    bad = int(state["bad_step"])  # the one host sync, at logging intervals only
    if bad >= 0:
        epoch, step = divmod(bad, steps_per_epoch_)
        raise TrainingError(
            f"the {spec.label} loss became non-finite (NaN or inf) at epoch {epoch + 1}, step {step + 1}; "
            "the last checkpoint was kept. The learning rate is the usual cause: lower it "
            "(e.g. --set train.optimizer.learning_rate=...) or set train.optimizer.clip_norm."
        )
