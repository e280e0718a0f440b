"""The one epoch loop: ``fkd teacher``, ``fkd distill`` and each group of ``fkd sweep`` train through it.

It drives a pure ``step(state, batch, teacher_vars) -> (state, metrics)`` over a data source and owns
everything impure around it: progress, host syncs, the non-finite check, checkpoints, and Ctrl-C /
SIGTERM. Within an epoch the metrics (loss terms, accuracy tallies, the non-finite guard's ``bad_step``)
are summed on the device (:func:`accumulate`); every ``log_every`` steps and at the epoch's end they
come to the host in one transfer (:func:`to_host`) -- one synchronisation per log interval, none per step.

Under torchrun (see :mod:`fkd.distributed`) each rank takes its slice of every global batch, only rank 0
shows progress, and a signal is acted on at the next sync point, where the ranks agree on it (one small
all-reduce), so every rank stops after the same step and rank 0 writes the one checkpoint.

Resumption is exact: the data order and augmentation are functions of (seed, epoch, batch) (see
:mod:`fkd.data.order`), the train state is saved whole, and the global RNG state travels with it, so
a run interrupted at any step and resumed ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import signal
import time
from typing import Any, Callable, Iterable, Iterator

import attrs
import torch

from fkd import distributed
from fkd.data.order import batch_count
from fkd.errors import TrainingError
from fkd.population import Population
from fkd.progress import Progress
from fkd.step import float32_math


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
    """What the loop needs to know besides the step.

    ``label`` names what is trained in messages ("teacher", "student"); ``title`` replaces it at the start
    of the progress line and ``detail`` is added after the epoch, in brackets (a sweep: "group 1/2",
    "8 students"). ``on_non_finite`` is ``"stop"`` (a plain run: stop with a message) or ``"freeze"``
    (a population: the step's :func:`fkd.population.freeze_diverged` keeps a diverged member as it was,
    and its records say ``diverged``). ``precision``: ``train.precision``; ``"tf32"`` turns on the TF32
    math mode for the whole run on CUDA (:func:`fkd.step.float32_math`).
    """

    label: str  # "teacher" or "student", for messages
    epochs: int
    batch_size: int
    seed: int
    augment: bool
    log_every: int = 50
    checkpoint_every: int = 0
    quiet: bool = False
    title: str = ""
    detail: str = ""
    on_non_finite: str = "stop"
    precision: str = "fp32"


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped so the compiled step sees one shape)."""
    return batch_count(num_examples, batch_size, drop_last=True)


def single_order_batches(source, spec: LoopSpec, batch_extras: Callable[[torch.Tensor], dict] | None = None):
    """``batches(epoch, start)``: the batch dicts of one model's epoch, in the order of ``(spec.seed, epoch)``.

    Under torchrun each rank keeps its share of every global batch (:meth:`fkd.distributed.World.interleaved`);
    ``batch_extras(idx)`` adds cached teacher outputs.
    """
    world = distributed.world()

    def batches(epoch: int, start: int) -> Iterator[dict]:
        for x, y, idx in source.batches(spec.batch_size, shuffle=True, epoch=epoch, seed=spec.seed, start=start,
                                        augment=spec.augment, drop_last=True):
            if world.parallel:  # this rank's share of the global batch (see fkd.data_parallel)
                mine = world.interleaved()
                x, y, idx = x[mine], y[mine], idx[mine]
            batch = {"x": x, "y": y, "idx": idx}
            if batch_extras is not None:
                batch.update(batch_extras(idx))
            yield batch

    return batches


def run_epochs(
    step: Callable,
    state: Any,
    source,
    spec: LoopSpec,
    *,
    population: Population | None = None,
    batches: Callable[[int, int], Iterable] | None = None,
    teacher_vars: dict | None = None,
    batch_extras: Callable[[torch.Tensor], dict] | None = None,
    evaluate: Callable[[Any], Any] | None = None,
    learning_rate: Callable[[Any], Any] | None = None,
    save: Callable[[Any, int, int], None] | None = None,
    on_epoch: Callable[[Any], None] | None = None,
    start_epoch: int = 0,
    start_batch: int = 0,
    stop: StopRequest | None = None,
    sink=None,
) -> Any:
    """Train from ``(start_epoch, start_batch)`` to the end; returns the final state.

    One loop drives every training: a teacher fit, a distillation, a sweep's group. ``step`` is a
    single model's step (``population`` None) or a population's (:meth:`fkd.population.Population.wrap`),
    whose metrics carry a leading axis of members; then ``evaluate`` and ``learning_rate`` return one
    value per member and ``on_epoch`` receives the list of member records.

    Args:
        source: the training split (its length sets the steps per epoch).
        batches: ``(epoch, start) -> iterable of step batches``; by default :func:`single_order_batches`
            over ``source`` with ``batch_extras``.
        batch_extras: ``idx -> {...}`` merged into each batch (cached teacher outputs).
        evaluate: ``state -> test accuracy`` at each epoch end.
        learning_rate: ``state -> lr`` for the metrics.
        save: ``save(state, epoch, batch)`` writes a checkpoint from which training resumes at
            ``(epoch, batch)``; called at epoch ends, every ``checkpoint_every`` steps, and on a signal.
        on_epoch: receives each epoch's metrics record (for metrics.jsonl), or the list of member records.
        stop: a :class:`StopRequest` shared with the caller (a sweep's groups); by default the loop
            installs its own.
        sink: a :class:`fkd.log_sinks.MetricSink` (TensorBoard, W&B) that receives, at each log interval,
            the interval's mean loss terms, grad norm, accuracy and the learning rate (one transfer to the
            host, where the interval syncs anyway), and each epoch's records.

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
    if batches is None:
        batches = single_order_batches(source, spec, batch_extras)
    members = population.size if population is not None else 1
    bad_steps = population.bad_steps if population is not None else (lambda st: st["bad_step"].reshape(1))
    checks = spec.on_non_finite != "freeze"
    run_start = time.perf_counter()
    world = distributed.world()
    detail = spec.detail or (f"{world.size} processes" if world.parallel else "")
    if sink is not None:
        sink.begin(start_epoch * nb + start_batch)
    with (contextlib.nullcontext(stop) if stop is not None else StopRequest()) as stop, \
            float32_math(spec.precision, getattr(source, "device", "cpu")):
        for epoch in range(start_epoch, spec.epochs):
            first = start_batch if epoch == start_epoch else 0
            progress = None if spec.quiet or not world.is_main else Progress(
                nb, f"{spec.title or spec.label} epoch {epoch + 1}/{spec.epochs}" + (f" ({detail})" if detail else ""))
            sums: dict[str, torch.Tensor] = {}
            seen: EpochFigures | None = None  # the host copy of the sums, taken at the last sync point
            logged: EpochFigures | None = None  # the host figures at the last log interval (for the sink)
            done, images, t0, stopping = first, 0, time.perf_counter(), False

            def figures() -> EpochFigures:
                """The sums on the host, one transfer since the last step (a sync point's only sync)."""
                nonlocal seen
                if seen is None:
                    seen = to_host(bad_steps(state), sums, done - first)
                return seen

            def check() -> None:
                if checks:
                    _check_finite(figures(), spec, nb, sums)

            for batch in batches(epoch, first):
                state, metrics = step(state, batch, teacher_vars)
                sums = accumulate(sums, metrics)
                seen = None
                done += 1
                images += spec.batch_size * members
                sync = done % spec.log_every == 0 or done == nb
                if sync:
                    check()
                    if progress is not None:
                        progress.update(done, loss=figures().mean("loss"),
                                        **{"img/s": images / (time.perf_counter() - t0)})
                    if sink is not None:
                        now = figures()
                        rows = interval_means(now, logged, members)
                        if learning_rate is not None:
                            for row, lr in zip(rows, _per_member(learning_rate(state), members)):
                                row["lr"] = lr
                        sink.train(epoch * nb + done, rows)
                        logged = now
                if spec.checkpoint_every and done % spec.checkpoint_every == 0 and done < nb and save:
                    check()
                    save(state, epoch, done)
                stopping = should_stop(stop, world, sync)
                if stopping and done < nb:
                    check()
                    if save:
                        save(state, epoch, done)
                    raise Interrupted(stop.signum or signal.SIGTERM, epoch, done)
                # at the epoch's last step: its record and checkpoint first, then the stop (below)
            if progress is not None:
                progress.close()
            check()
            host = figures()
            seconds = time.perf_counter() - t0
            shared = {"images_per_s": images / seconds if seconds > 0 else None, "epoch_seconds": seconds,
                      "wall_seconds": time.perf_counter() - run_start}
            tests = _per_member(evaluate(state) if evaluate else None, members)
            rates = _per_member(learning_rate(state) if learning_rate else None, members)
            diverged = host.bad_steps if spec.on_non_finite == "freeze" else None
            records = []
            for k in range(members):
                record = {
                    "epoch": epoch + 1,
                    "train_loss": host.mean("loss", k),
                    **{f"train_{name}": host.mean(name, k) for name in sums if name not in _NOT_LOSSES},
                    "train_acc": host.member("correct", k) / max(host.member("count", k), 1.0),
                    "test_acc": tests[k],
                    "images_per_s": shared["images_per_s"],
                    "lr": rates[k],
                    "epoch_seconds": shared["epoch_seconds"],
                    "wall_seconds": shared["wall_seconds"],
                }
                if first:
                    record["resumed_at_step"] = first
                if diverged is not None:
                    record["diverged"] = diverged[k] >= 0
                records.append(record)
            # The record first: a crash between the two leaves a record the checkpoint has not reached,
            # which a resume drops and writes again, never a finished epoch without its record.
            if on_epoch:
                on_epoch(records if population is not None else records[0])
            if sink is not None:
                sink.epoch((epoch + 1) * nb, records)
            if save:
                save(state, epoch + 1, 0)
            if stopping and epoch + 1 < spec.epochs:  # after the last epoch the run is complete anyway
                raise Interrupted(stop.signum or signal.SIGTERM, epoch, done)
    return state


_NOT_LOSSES = ("loss", "correct", "count", "finite", "grad_norm", "steps")


def accumulate(sums: dict, metrics: dict) -> dict:
    """The epoch's running sums of a step's metrics, on the device (no host sync): 0-d tensors, or ``(K,)``
    for a population. The first step's metrics are copied, never aliased: a step compiled with CUDA graphs
    (``compile_mode = "reduce-overhead"``) writes its next outputs into the same memory."""
    add = {k: v.detach() for k, v in metrics.items() if k != "finite"}
    if not sums:
        return {k: v.clone() for k, v in add.items()}
    return {k: sums[k] + v for k, v in add.items()}


@attrs.frozen
class EpochFigures:
    """The epoch's summed metrics on the host, per member: ``values[name][k]`` (Python floats), ``steps``
    summed and each member's first non-finite step (``bad_steps``, -1 while well)."""

    values: dict
    steps: int
    bad_steps: list

    def member(self, key: str, k: int = 0) -> float:
        """Member ``k``'s sum of ``key``."""
        return self.values[key][k]

    def mean(self, key: str, k: int = 0) -> float:
        """Member ``k``'s mean of ``key`` per step (NaN when the step returned no such metric)."""
        return self.values[key][k] / max(self.steps, 1) if key in self.values else float("nan")


def to_host(bad_steps: torch.Tensor, sums: dict, steps: int) -> EpochFigures:
    """``bad_steps`` and every running sum brought to the host in one transfer -- the loop's one host
    synchronisation per log interval.

    All values travel as one float64 vector: exact for the float32 sums and for the int64 counts and step
    indices (below ``2**53``), so the figures equal ``float()`` of each tensor read on its own.
    """
    names = list(sums)
    parts = [bad_steps.reshape(-1), *(sums[n].reshape(-1) for n in names)]
    flat = torch.cat([p.to(torch.float64) for p in parts]).tolist()
    values, at = {}, parts[0].numel()
    for name, part in zip(names, parts[1:]):
        values[name] = flat[at:at + part.numel()]
        at += part.numel()
    return EpochFigures(values, steps, [int(v) for v in flat[:parts[0].numel()]])


def interval_means(now: EpochFigures, last: EpochFigures | None, members: int) -> list[dict[str, float]]:
    """Per member, the means since the last log interval (``last``: the figures then, None at an epoch's
    start) of each loss term, the total loss and the grad norm, and the interval's training accuracy -- from
    host figures the loop already holds, so no transfer of its own."""
    steps = max(now.steps - (last.steps if last is not None else 0), 1)
    names = [k for k in now.values if k not in ("correct", "count")]

    def delta(name: str, k: int) -> float:
        before = last.member(name, k) if last is not None and name in last.values else 0.0
        return now.member(name, k) - before

    rows = []
    for k in range(members):
        row = {name: delta(name, k) / steps for name in names}
        row["acc"] = delta("correct", k) / max(delta("count", k), 1.0)
        rows.append(row)
    return rows


def _per_member(value: Any, members: int) -> list:
    """One value per member: a population's list as it is, a single model's value in a list."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * members


def _check_finite(figures: EpochFigures, spec: LoopSpec, steps_per_epoch_: int, sums: dict) -> None:
    bad = max(figures.bad_steps)
    if bad >= 0:
        epoch, step = divmod(bad, steps_per_epoch_)
        raise TrainingError(
            f"the {spec.label} loss became non-finite (NaN or inf) at epoch {epoch + 1}, step {step + 1}; "
            f"the last checkpoint was kept. {_what_became_non_finite(sums)}"
        )


def _what_became_non_finite(sums: dict) -> str:
    """Which part went non-finite, and the advice that fits it, from the epoch's summed metrics (read only
    once the guard has stopped the run: a NaN or inf in any step leaves its sum non-finite)."""
    lr = "lower it (e.g. --set train.optimizer.learning_rate=...) or set train.optimizer.clip_norm"
    terms = [k for k, v in sums.items() if k not in _NOT_LOSSES and not bool(torch.isfinite(v).all())]
    every = [k for k in sums if k not in _NOT_LOSSES]
    if terms and len(terms) < len(every):
        named = ", ".join(f"'{t}'" for t in terms)
        return (f"The {named} loss term{'s' if len(terms) > 1 else ''} became non-finite while the others stayed "
                f"finite: check {'their' if len(terms) > 1 else 'its'} settings and inputs (a user's term: its "
                f"formula); if the model itself diverged, the learning rate is the usual cause: {lr}.")
    if terms:
        return f"Every loss term became non-finite: the model diverged, and the learning rate is the usual cause: {lr}."
    if "loss" in sums and not bool(torch.isfinite(sums["loss"]).all()):
        return ("Every term stayed finite but their weighted sum did not: lower the large term weights in "
                "distill.terms.")
    return (f"The loss stayed finite but its gradients did not (a term's gradient overflowed or is undefined, e.g. "
            f"a square root at 0); the learning rate is the usual cause: {lr}.")
