"""Learning-rate schedules: plain functions of the step count.

A schedule is ``schedule(count) -> value``. ``count`` is a 0-d tensor holding the number of updates
already applied (int64 as kept in the optimizer state, or a float tensor); the result is a 0-d float
tensor on ``count``'s device. An integer count is evaluated in the default float dtype
(``torch.get_default_dtype()``, float32 unless changed); a float count is evaluated in its own dtype.

Every schedule is built from tensor ops only (``torch.where``, ``torch.clamp``, ``torch.cos``): no
``.item()`` and no Python branching on the count, so a schedule traces into one graph under
``torch.compile`` and maps over a batch of counts under ``torch.func.vmap``. Python branches below
depend only on the hyperparameters, which are fixed when the schedule is built.

The step count starts at 0 and the optimizer evaluates ``schedule(count)`` before incrementing it, so
the first update uses ``schedule(0)``: the same convention as optax and as
``torch.optim.lr_scheduler``, whose schedulers are stepped after ``optimizer.step()``.

A config names its schedule (``train.optimizer.schedule``) from the registry :data:`SCHEDULES`, whose
entries state the schedules above in epochs; :func:`learning_rate_schedule` builds the one a config asks for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fkd.errors import ConfigError
from fkd.registry import Registry, options_of

if TYPE_CHECKING:  # annotations only: fkd.config looks schedule names up here, so imports go one way
    from fkd.config import OptimizerConfig

Schedule = Callable[[Tensor], Tensor]


def _as_float(count: Tensor) -> Tensor:
    """``count`` as a floating-point tensor (integer counts go to the default float dtype)."""
    if count.is_floating_point():
        return count
    return count.to(torch.get_default_dtype())


def _cosine_anneal(start: float, end: float, pct: Tensor) -> Tensor:
    """Half a cosine from ``start`` (``pct = 0``) to ``end`` (``pct = 1``).

    ``end + (start - end) * (1 + cos(pi * pct)) / 2`` (Loshchilov & Hutter 2017, eq. 5).
    """
    return end + (start - end) * 0.5 * (1.0 + torch.cos(math.pi * pct))


def constant(value: float) -> Schedule:
    """The schedule that is ``value`` at every step."""
    value = float(value)

    def schedule(count: Tensor) -> Tensor:
        return torch.full_like(_as_float(count), value)

    return schedule


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Cosine annealing from ``init_value`` down to ``alpha * init_value`` over ``decay_steps`` steps.

    With ``t = min(count, decay_steps) / decay_steps`` (SGDR without restarts; Loshchilov & Hutter 2017,
    eq. 5, with ``eta_max = init_value`` and ``eta_min = alpha * init_value``)::

        lr(count) = init_value * ((1 - alpha) * (1 + cos(pi * t)) / 2 + alpha)

    This equals ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=decay_steps,
    eta_min=alpha * init_value)`` for ``count <= decay_steps``; afterwards it stays at the final value
    instead of rising again.
    """
    if decay_steps <= 0:
        raise ConfigError(f"cosine_decay needs decay_steps > 0, got {decay_steps}.")
    init_value, alpha = float(init_value), float(alpha)

    def schedule(count: Tensor) -> Tensor:
        t = torch.clamp(_as_float(count), 0.0, decay_steps) / decay_steps
        return _cosine_anneal(init_value, alpha * init_value, t)

    return schedule


def warmup_cosine(
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    init_value: float = 0.0,
    end_value: float = 0.0,
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
    if warmup_steps < 0:
        raise ConfigError(f"warmup_cosine needs warmup_steps >= 0, got {warmup_steps}.")
    if decay_steps <= warmup_steps:
        raise ConfigError(
            f"warmup_cosine needs decay_steps > warmup_steps (decay_steps counts the warmup too), "
            f"got decay_steps={decay_steps}, warmup_steps={warmup_steps}."
        )
    peak_value, init_value, end_value = float(peak_value), float(init_value), float(end_value)

    def schedule(count: Tensor) -> Tensor:
        t = _as_float(count)
        # max(..., 1): with no warmup the first branch is never selected; this only avoids 0/0.
        warm = init_value + (peak_value - init_value) * t / max(warmup_steps, 1)
        pct = torch.clamp((t - warmup_steps) / (decay_steps - warmup_steps), 0.0, 1.0)
        cool = _cosine_anneal(peak_value, end_value, pct)
        return torch.where(t < warmup_steps, warm, cool)

    return schedule


def multistep(init_value: float, boundaries: Sequence[int], gamma: float = 0.1) -> Schedule:
    """Piecewise constant: ``init_value`` multiplied by ``gamma`` at each boundary step.

    ``lr(count) = init_value * gamma ** n`` with ``n`` the number of boundaries ``b <= count``: the
    step decay of He et al. 2016 and ``torch.optim.lr_scheduler.MultiStepLR(milestones=boundaries)``
    (a boundary listed twice multiplies by ``gamma`` twice there, as in MultiStepLR).
    """
    if any(b < 0 for b in boundaries):
        raise ConfigError(f"multistep boundaries must be >= 0, got {list(boundaries)}.")
    init_value, gamma = float(init_value), float(gamma)
    boundaries = tuple(int(b) for b in boundaries)

    def schedule(count: Tensor) -> Tensor:
        t = _as_float(count)
        passed = torch.zeros_like(t)
        for b in boundaries:
            passed = passed + (t >= b).to(t.dtype)
        return init_value * torch.pow(gamma, passed)

    return schedule


def one_cycle(
    max_value: float,
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
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
    if total_steps < 2:
        raise ConfigError(f"one_cycle needs total_steps >= 2, got {total_steps}.")
    if not 0.0 < pct_start < 1.0:
        raise ConfigError(f"one_cycle needs 0 < pct_start < 1, got {pct_start}.")
    if div_factor <= 0 or final_div_factor <= 0:
        raise ConfigError(
            f"one_cycle needs positive div_factor and final_div_factor, got {div_factor}, {final_div_factor}."
        )
    max_value = float(max_value)
    initial = max_value / div_factor
    final = initial / final_div_factor
    peak_step = float(pct_start * total_steps) - 1.0
    last_step = float(total_steps - 1)

    def schedule(count: Tensor) -> Tensor:
        t = _as_float(count)
        # The guard only matters when the rise is empty (peak_step <= 0); then count / peak_step is unused
        # except at count == peak_step == 0, where OneCycleLR divides 0 by 0 and we take the start value.
        rise = _cosine_anneal(initial, max_value, torch.clamp(t / max(peak_step, 1e-12), 0.0, 1.0))
        fall_pct = torch.clamp((t - peak_step) / (last_step - peak_step), 0.0, 1.0)
        fall = _cosine_anneal(max_value, final, fall_pct)
        return torch.where(t <= peak_step, rise, fall)

    return schedule


# ---------------------------------------------------------------------------------------------------
# Schedules by name, from a config
# ---------------------------------------------------------------------------------------------------

SCHEDULES = Registry("schedule", "optimizer.schedule")
"""``optimizer.schedule`` names. An entry is ``entry(learning_rate, steps_per_epoch, epochs, **keys) -> Schedule``:
it turns the config's epochs into steps for one of the schedules above. ``keys`` are the entry's keyword-only
parameters: they are the schedule's options, keys of ``[train.optimizer]`` (see :func:`learning_rate_schedule`)."""


def _total_steps(steps_per_epoch: int, epochs: int) -> int:
    """Optimizer steps in the whole run, at least 1."""
    return max(steps_per_epoch * epochs, 1)


@SCHEDULES.register("constant")
def _constant_from_config(learning_rate: float, steps_per_epoch: int, epochs: int) -> Schedule:
    """``learning_rate`` at every step."""
    return constant(learning_rate)


@SCHEDULES.register("cosine")
def _cosine_from_config(learning_rate: float, steps_per_epoch: int, epochs: int) -> Schedule:
    """Cosine decay from ``learning_rate`` to 0 over the whole run (:func:`cosine_decay`)."""
    return cosine_decay(learning_rate, _total_steps(steps_per_epoch, epochs))


@SCHEDULES.register("warmup_cosine")
def _warmup_cosine_from_config(learning_rate: float, steps_per_epoch: int, epochs: int, *,
                               warmup_epochs: float = 0.0) -> Schedule:
    """Linear warmup over ``round(warmup_epochs * steps_per_epoch)`` steps, then cosine decay to 0 at the
    end of the run (:func:`warmup_cosine`).

    Args:
        warmup_epochs: warmup_cosine: warmup length in epochs
    """
    total = _total_steps(steps_per_epoch, epochs)
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if warmup >= total:
        raise ConfigError(
            f"optimizer.warmup_epochs = {warmup_epochs} covers the whole run of {epochs} epochs; lower it."
        )
    return warmup_cosine(learning_rate, warmup, total)


@SCHEDULES.register("multistep")
def _multistep_from_config(learning_rate: float, steps_per_epoch: int, epochs: int, *,
                           milestones: Sequence[int] = (), gamma: float = 0.1) -> Schedule:
    """``learning_rate`` multiplied by ``gamma`` at the start of each milestone epoch (:func:`multistep`).

    Args:
        milestones: multistep: epochs at which the rate is multiplied by gamma
        gamma: multistep: decay factor
    """
    return multistep(learning_rate, [m * steps_per_epoch for m in milestones], gamma)


@SCHEDULES.register("one_cycle")
def _one_cycle_from_config(learning_rate: float, steps_per_epoch: int, epochs: int) -> Schedule:
    """The 1cycle policy over the whole run with ``learning_rate`` as its peak (:func:`one_cycle`)."""
    return one_cycle(learning_rate, max(_total_steps(steps_per_epoch, epochs), 2))


def learning_rate_schedule(cfg: OptimizerConfig, steps_per_epoch: int, epochs: int, *,
                           key: str = "train.optimizer") -> Schedule:
    """The schedule ``cfg.schedule`` over ``epochs * steps_per_epoch`` optimizer steps, peaking at
    ``cfg.learning_rate``.

    The schedule gets those of ``cfg.options`` its builder takes (its other keys belong to the optimizer;
    :func:`fkd.optim.optimizer_from_config` and :mod:`fkd.build` refuse keys that neither takes).
    ``key`` is where ``cfg`` sits in the run config, for messages.
    """
    entry = SCHEDULES.get(cfg.schedule, key=f"{key}.schedule")
    kwargs = {k: v for k, v in cfg.options.items() if k in options_of(entry)}
    return entry(cfg.learning_rate, steps_per_epoch, epochs, **kwargs)


def current_lr(schedule: Schedule, state: dict) -> float:
    """The learning rate the next step will use, ``schedule(state["step"])``, as a Python float.

    A host sync: call it at epoch ends only.
    """
    return float(schedule(state["step"].cpu()))
