"""Learning-rate schedules: plain functions of the step count.

A schedule is ``schedule(count) -> value``. ``count`` is a 0-d tensor holding the number of updates
already applied (int64 as kept in the optimizer state, or a float tensor); the result is a 0-d float
tensor on ``count``'s device. An integer count is evaluated in the default float dtype
(``torch.get_default_dtype()``, float32 unless changed); a float count is evaluated in its own dtype.

Every schedule is built from tensor ops only (``torch.where``, ``torch.clamp``, ``torch.cos``): no
``.item()`` and no Python branching on the count, so a schedule traces into one graph under
``torch.compile`` and maps over a batch of counts under ``torch.func.vmap``.

A schedule's own numbers (peak value, warmup length, decay factor, boundaries) may be Python numbers or
0-d tensors (boundaries: a 1-d tensor), and no Python branch depends on their values either: ranges are
checked when they are Python numbers, which is when a config builds them. Tensor numbers are cast to the
count's float dtype. That is what lets the optimizer keep a schedule's numbers in its state
(:func:`fkd.optim.inject_hyperparams`): an :class:`InjectableSchedule` is a builder and its numbers,
rebuilt from the state's tensors at every update, so students that differ only in learning rate, warmup
length or decay factor share one state structure and one traced step.

The step count starts at 0 and the optimizer evaluates ``schedule(count)`` before incrementing it, so
the first update uses ``schedule(0)``: the same convention as optax and as
``torch.optim.lr_scheduler``, whose schedulers are stepped after ``optimizer.step()``.

A config names its schedule (``train.optimizer.schedule``) from the registry :data:`SCHEDULES`, whose
entries state the schedules above in epochs; :func:`learning_rate_schedule` builds the one a config asks
for, as an :class:`InjectableSchedule` whose numbers are counted in steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fkd.errors import ConfigError
from fkd.registry import Registry, naming_options, options_of

if TYPE_CHECKING:  # annotations only: fkd.config looks schedule names up here, so imports go one way
    from fkd.config import OptimizerConfig

Schedule = Callable[[Tensor], Tensor]
Number = float | Tensor  # a Python number, or a 0-d tensor (from an optimizer state)


def _as_float(count: Tensor) -> Tensor:
    """``count`` as a floating-point tensor (integer counts go to the default float dtype)."""
    if count.is_floating_point():
        return count
    return count.to(torch.get_default_dtype())


def _python(*values: Any) -> bool:
    """Whether none of ``values`` is a tensor: only then are ranges checked (a tensor's value is unknown
    while tracing, and reading it would sync with the device)."""
    return not any(isinstance(v, Tensor) for v in values)


def _number(value: Any) -> Number:
    """A Python number as a float; a tensor as it is."""
    return value if isinstance(value, Tensor) else float(value)


def _like(value: Number, t: Tensor) -> Number:
    """``value`` in ``t``'s dtype if it is a tensor (a Python number is cast by each op, as before)."""
    return value.to(t.dtype) if isinstance(value, Tensor) else value


def _at_least(value: Number, floor: float) -> Number:
    """``max(value, floor)``, for a Python number or a tensor."""
    return torch.clamp(value, min=floor) if isinstance(value, Tensor) else max(value, floor)


@dataclass(frozen=True)
class InjectableSchedule:
    """A schedule given as a builder and its numbers: ``build(**numbers)`` is the schedule.

    Calling it is calling that schedule. :func:`fkd.optim.inject_hyperparams` keeps ``numbers`` in the
    optimizer state as tensors (floats as 0-d tensors, sequences such as boundaries as 1-d tensors) and
    rebuilds the schedule from them at each update, so the state holds the schedule's numbers and the
    builder, which has no Python branch on them, is the structure. ``build`` validates Python numbers
    (``ConfigError``), so the numbers are checked when this is built.
    """

    build: Callable[..., Schedule]
    numbers: dict[str, Any]

    def __post_init__(self) -> None:
        self.build(**self.numbers)  # checks the numbers' ranges now, with their config messages

    def __call__(self, count: Tensor) -> Tensor:
        return self.build(**self.numbers)(count)

    def with_numbers(self, numbers: dict[str, Any]) -> Schedule:
        """The schedule with ``numbers`` (e.g. the tensors kept in an optimizer state) instead."""
        return self.build(**numbers)


def _cosine_anneal(start: Number, end: Number, pct: Tensor) -> Tensor:
    """Half a cosine from ``start`` (``pct = 0``) to ``end`` (``pct = 1``).

    ``end + (start - end) * (1 + cos(pi * pct)) / 2`` (Loshchilov & Hutter 2017, eq. 5).
    """
    return end + (start - end) * 0.5 * (1.0 + torch.cos(math.pi * pct))


def constant(value: Number) -> Schedule:
    """The schedule that is ``value`` at every step."""
    value = _number(value)

    def schedule(count: Tensor) -> Tensor:
        t = _as_float(count)
        if isinstance(value, Tensor):
            return torch.zeros_like(t) + value.to(t.dtype)
        return torch.full_like(t, value)

    return schedule


def cosine_decay(init_value: Number, decay_steps: Number, alpha: Number = 0.0) -> Schedule:
    """Cosine annealing from ``init_value`` down to ``alpha * init_value`` over ``decay_steps`` steps.

    With ``t = min(count, decay_steps) / decay_steps`` (SGDR without restarts; Loshchilov & Hutter 2017,
    eq. 5, with ``eta_max = init_value`` and ``eta_min = alpha * init_value``)::

        lr(count) = init_value * ((1 - alpha) * (1 + cos(pi * t)) / 2 + alpha)

    This equals ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=decay_steps,
    eta_min=alpha * init_value)`` for ``count <= decay_steps``; afterwards it stays at the final value
    instead of rising again.
    """
    if _python(decay_steps) and decay_steps <= 0:
        raise ConfigError(f"cosine_decay needs decay_steps > 0, got {decay_steps}.")
    init_value, decay_steps, alpha = _number(init_value), _number(decay_steps), _number(alpha)

    def schedule(count: Tensor) -> Tensor:
        t = _as_float(count)
        peak, steps, a = _like(init_value, t), _like(decay_steps, t), _like(alpha, t)
        # clamp(t / steps, 0, 1) is clamp(t, 0, steps) / steps, bit for bit, and takes a tensor ``steps``.
        return _cosine_anneal(peak, a * peak, torch.clamp(t / steps, 0.0, 1.0))

    return schedule


def warmup_cosine(
    peak_value: Number,
    warmup_steps: Number,
    decay_steps: Number,
    init_value: Number = 0.0,
    end_value: Number = 0.0,
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value``, then cosine decay to ``end_value``.

    ``decay_steps`` is the length of the whole schedule, warmup included (as in optax's
    ``warmup_cosine_decay_schedule``)::

        count < warmup_steps:  lr = init_value + (peak_value - init_value) * count / warmup_steps
        otherwise:             t  = clamp((count - warmup_steps) / (decay_steps - warmup_steps), 0, 1)
                               lr = end_value + (peak_value - end_value) * (1 + cos(pi * t)) / 2

    Warmup follows Goyal et al. 2017 ("Accurate, Large Minibatch SGD"); the decay is SGDR's cosine
    (Loshchilov & Hutter 2017, eq. 5). The value stays at ``end_value`` after ``decay_steps``.
    """
    if _python(warmup_steps) and warmup_steps < 0:
        raise ConfigError(f"warmup_cosine needs warmup_steps >= 0, got {warmup_steps}.")
    if _python(warmup_steps, decay_steps) and decay_steps <= warmup_steps:
        raise ConfigError(
            f"warmup_cosine needs decay_steps > warmup_steps (decay_steps counts the warmup too), "
            f"got decay_steps={decay_steps}, warmup_steps={warmup_steps}."
        )
    numbers = tuple(_number(v) for v in (peak_value, warmup_steps, decay_steps, init_value, end_value))

    def schedule(count: Tensor) -> Tensor:
        t = _as_float(count)
        peak, warmup, decay, start, end = (_like(v, t) for v in numbers)
        # at least 1: with no warmup the first branch is never selected; this only avoids 0/0.
        warm = start + (peak - start) * t / _at_least(warmup, 1)
        pct = torch.clamp((t - warmup) / (decay - warmup), 0.0, 1.0)
        cool = _cosine_anneal(peak, end, pct)
        return torch.where(t < warmup, warm, cool)

    return schedule


def multistep(init_value: Number, boundaries: Sequence[int] | Tensor, gamma: Number = 0.1) -> Schedule:
    """Piecewise constant: ``init_value`` multiplied by ``gamma`` at each boundary step.

    ``lr(count) = init_value * gamma ** n`` with ``n`` the number of boundaries ``b <= count``: the
    step decay of He et al. 2016 and ``torch.optim.lr_scheduler.MultiStepLR(milestones=boundaries)``
    (a boundary listed twice multiplies by ``gamma`` twice there, as in MultiStepLR). ``boundaries``
    may be a 1-d tensor; its length, not its values, is then the schedule's structure.
    """
    if _python(boundaries) and any(b < 0 for b in boundaries):
        raise ConfigError(f"multistep boundaries must be >= 0, got {list(boundaries)}.")
    init_value, gamma = _number(init_value), _number(gamma)
    if _python(boundaries):
        boundaries = tuple(int(b) for b in boundaries)

    def schedule(count: Tensor) -> Tensor:
        t = _as_float(count)
        if isinstance(boundaries, Tensor):  # n = sum_b [t >= b], over the last axis (vmap adds axes in front)
            passed = (t.unsqueeze(-1) >= boundaries.to(t.dtype)).to(t.dtype).sum(-1)
        else:
            passed = torch.zeros_like(t)
            for b in boundaries:
                passed = passed + (t >= b).to(t.dtype)
        return _like(init_value, t) * torch.pow(_like(gamma, t), passed)

    return schedule


def one_cycle(
    max_value: Number,
    total_steps: Number,
    pct_start: Number = 0.3,
    div_factor: Number = 25.0,
    final_div_factor: Number = 1e4,
) -> Schedule:
    """The 1cycle policy (Smith & Topin 2017, "Super-Convergence"), with cosine annealing.

    Rises from ``max_value / div_factor`` to ``max_value``, then falls to
    ``max_value / (div_factor * final_div_factor)``. As in ``torch.optim.lr_scheduler.OneCycleLR`` with
    ``anneal_strategy="cos"`` (momentum cycling is not part of a learning-rate schedule), the peak is at
    ``e1 = pct_start * total_steps - 1`` and the floor at ``e2 = total_steps - 1``::

        count <= e1:  lr = anneal(initial, max_value, count / e1)
        otherwise:    lr = anneal(max_value, final, clamp((count - e1) / (e2 - e1), 0, 1))
        anneal(a, b, p) = b + (a - b) * (1 + cos(pi * p)) / 2

    Past ``total_steps - 1`` the value stays at the floor (OneCycleLR raises there instead).
    """
    if _python(total_steps) and total_steps < 2:
        raise ConfigError(f"one_cycle needs total_steps >= 2, got {total_steps}.")
    if _python(pct_start) and not 0.0 < pct_start < 1.0:
        raise ConfigError(f"one_cycle needs 0 < pct_start < 1, got {pct_start}.")
    if _python(div_factor, final_div_factor) and (div_factor <= 0 or final_div_factor <= 0):
        raise ConfigError(
            f"one_cycle needs positive div_factor and final_div_factor, got {div_factor}, {final_div_factor}."
        )
    numbers = tuple(_number(v) for v in (max_value, total_steps, pct_start, div_factor, final_div_factor))

    def schedule(count: Tensor) -> Tensor:
        t = _as_float(count)
        peak, total, pct, div, final_div = (_like(v, t) for v in numbers)
        initial = peak / div
        final = initial / final_div
        peak_step = pct * total - 1.0
        last_step = total - 1.0
        # The guard only matters when the rise is empty (peak_step <= 0); then count / peak_step is unused
        # except at count == peak_step == 0, where OneCycleLR divides 0 by 0 and we take the start value.
        rise = _cosine_anneal(initial, peak, torch.clamp(t / _at_least(peak_step, 1e-12), 0.0, 1.0))
        fall_pct = torch.clamp((t - peak_step) / (last_step - peak_step), 0.0, 1.0)
        fall = _cosine_anneal(peak, final, fall_pct)
        return torch.where(t <= peak_step, rise, fall)

    return schedule


# ---------------------------------------------------------------------------------------------------
# Schedules by name, from a config
# ---------------------------------------------------------------------------------------------------

SCHEDULES = Registry("schedule", "optimizer.schedule")
"""``optimizer.schedule`` names. An entry is ``entry(learning_rate, steps_per_epoch, epochs, **keys) -> Schedule``:
it turns the config's epochs into steps for one of the schedules above. ``keys`` are the entry's keyword-only
parameters: they are the schedule's options, keys of ``[train.optimizer]`` (see :func:`learning_rate_schedule`).
The built-in entries return an :class:`InjectableSchedule` whose numbers (the peak learning rate, the warmup
and decay lengths, ``gamma``, the boundaries) are counted in steps, so an optimizer state can hold them; an
entry may return a plain schedule, whose numbers then stay fixed in its closure."""


def _total_steps(steps_per_epoch: int, epochs: int) -> int:
    """Optimizer steps in the whole run, at least 1."""
    return max(steps_per_epoch * epochs, 1)


@SCHEDULES.register("constant")
def _constant_from_config(learning_rate: float, steps_per_epoch: int, epochs: int) -> Schedule:
    """``learning_rate`` at every step."""
    return InjectableSchedule(constant, {"value": learning_rate})


@SCHEDULES.register("cosine")
def _cosine_from_config(learning_rate: float, steps_per_epoch: int, epochs: int) -> Schedule:
    """Cosine decay from ``learning_rate`` to 0 over the whole run (:func:`cosine_decay`)."""
    return InjectableSchedule(cosine_decay, {"init_value": learning_rate,
                                             "decay_steps": _total_steps(steps_per_epoch, epochs)})


@SCHEDULES.register("warmup_cosine")
def _warmup_cosine_from_config(learning_rate: float, steps_per_epoch: int, epochs: int, *,
                               warmup_epochs: float = 0.0) -> Schedule:
    """Linear warmup over ``round(warmup_epochs * steps_per_epoch)`` steps, then cosine decay to 0 at the
    end of the run (:func:`warmup_cosine`).

    Args:
        warmup_epochs: warmup_cosine: warmup length in epochs
    """
    if not warmup_epochs >= 0:
        raise ConfigError(f"warmup_epochs must be >= 0 (got {warmup_epochs}).")
    total = _total_steps(steps_per_epoch, epochs)
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if warmup >= total:
        raise ConfigError(
            f"warmup_epochs = {warmup_epochs} covers the whole run of {epochs} epochs; lower it."
        )
    return InjectableSchedule(warmup_cosine, {"peak_value": learning_rate, "warmup_steps": warmup,
                                              "decay_steps": total})


@SCHEDULES.register("multistep")
def _multistep_from_config(learning_rate: float, steps_per_epoch: int, epochs: int, *,
                           milestones: Sequence[int] = (), gamma: float = 0.1) -> Schedule:
    """``learning_rate`` multiplied by ``gamma`` at the start of each milestone epoch (:func:`multistep`).

    The boundaries are kept as a 1-d tensor in an optimizer state: runs with as many milestones share a
    state structure.

    Args:
        milestones: multistep: epochs at which the rate is multiplied by gamma
        gamma: multistep: decay factor, > 0
    """
    if not gamma > 0:
        raise ConfigError(f"gamma must be > 0 (got {gamma}).")
    return InjectableSchedule(multistep, {"init_value": learning_rate, "gamma": gamma,
                                          "boundaries": tuple(m * steps_per_epoch for m in milestones)})


@SCHEDULES.register("one_cycle")
def _one_cycle_from_config(learning_rate: float, steps_per_epoch: int, epochs: int) -> Schedule:
    """The 1cycle policy over the whole run with ``learning_rate`` as its peak (:func:`one_cycle`)."""
    return InjectableSchedule(one_cycle, {"max_value": learning_rate,
                                          "total_steps": max(_total_steps(steps_per_epoch, epochs), 2)})


def learning_rate_schedule(cfg: OptimizerConfig, steps_per_epoch: int, epochs: int, *,
                           key: str = "train.optimizer") -> Schedule:
    """The schedule ``cfg.schedule`` over ``epochs * steps_per_epoch`` optimizer steps, peaking at
    ``cfg.learning_rate`` (for the built-in entries, an :class:`InjectableSchedule`).

    The schedule gets those of ``cfg.options`` its builder takes (its other keys belong to the optimizer;
    :func:`fkd.optim.optimizer_from_config` and :mod:`fkd.build` refuse keys that neither takes).
    ``key`` is where ``cfg`` sits in the run config, for messages.
    """
    entry = SCHEDULES.get(cfg.schedule, key=f"{key}.schedule")
    kwargs = {k: v for k, v in cfg.options.items() if k in options_of(entry)}
    with naming_options(key, kwargs):
        return entry(cfg.learning_rate, steps_per_epoch, epochs, **kwargs)


def current_lr(schedule: Schedule, count: Tensor, numbers: Any = None) -> float:
    """The learning rate the next update will use, ``schedule(count)``, as a Python float.

    ``count`` is the number of updates made (the train state's ``"step"``). ``numbers`` are the schedule's
    numbers as an optimizer state keeps them, ``fkd.optim.hyperparams(opt_state)["learning_rate"]``: for an
    :class:`InjectableSchedule`, a dict of tensors, from which the schedule is rebuilt; for a constant
    learning rate, that 0-d tensor itself. None: the schedule as built. A host sync: call it at epoch
    ends only.
    """
    count = count.cpu()
    if isinstance(numbers, Tensor):
        return float(numbers)
    if numbers is not None and isinstance(schedule, InjectableSchedule):
        schedule = schedule.with_numbers({k: v.cpu() for k, v in numbers.items()})
    return float(schedule(count))
