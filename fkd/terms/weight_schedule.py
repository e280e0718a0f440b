"""Term weight schedules: a term's weight as a function of the fractional epoch, declared in its table.

``[distill.terms.ab] weight = 1.0`` with ``weight_schedule = {kind = "until", epochs = 30}`` makes the
term's weight ``1.0 * factor(epoch)``; the objective (:mod:`fkd.objective`) multiplies each scheduled
term's weight by its factor in the step. ``epoch`` is the 0-d float tensor ``step / steps_per_epoch`` the
step computes (:class:`fkd.terms.TermInputs`), so a schedule is a few tensor ops: no host sync, no branch
on a tensor's value, no recompilation as the epoch advances, and it vmaps over a sweep's students (their
per-student weights are multiplied by the same factor).

Kinds (``e`` the fractional epoch, ``E`` the schedule's ``epochs``, ``r = clip(e / E, 0, 1)``):

========  ===============================================  ===================================================
kind      factor                                           used for
========  ===============================================  ===================================================
warmup    ``r``                                            DKD's and ReviewKD's linear warm-up
until     ``1`` while ``e < E``, then ``0``                 AB's and FSP's initialisation epochs
after     ``0`` while ``e < E``, then ``1``                 a term that joins later
linear    ``start + (end - start) r``                      any linear ramp
cosine    ``start + (end - start) (1 - cos(pi r)) / 2``    CTKD's cosine curriculum of lambda
========  ===============================================  ===================================================

A term may also derive a schedule from its own keys (:meth:`fkd.terms.Term.weight_schedule`): DKD's older
``warmup_epochs = w`` is ``{kind = "warmup", epochs = w}``.
"""

from __future__ import annotations

import difflib
import math
from typing import Callable

import attrs
import torch
from torch import Tensor

from fkd.errors import ConfigError


def _ramp(s: "WeightSchedule", r: Tensor, e: Tensor) -> Tensor:
    return r


def _until(s: "WeightSchedule", r: Tensor, e: Tensor) -> Tensor:
    return (e < s.epochs).to(e.dtype)


def _after(s: "WeightSchedule", r: Tensor, e: Tensor) -> Tensor:
    return (e >= s.epochs).to(e.dtype)


def _linear(s: "WeightSchedule", r: Tensor, e: Tensor) -> Tensor:
    return s.start + (s.end - s.start) * r


def _cosine(s: "WeightSchedule", r: Tensor, e: Tensor) -> Tensor:
    return s.start + (s.end - s.start) * (1 - torch.cos(math.pi * r)) / 2


#: kind -> factor(schedule, r = clip(e / E, 0, 1), e); one line of the table above each
KINDS: dict[str, Callable] = {"warmup": _ramp, "until": _until, "after": _after, "linear": _linear,
                              "cosine": _cosine}
KEYS = ("kind", "epochs", "start", "end")


@attrs.frozen
class WeightSchedule:
    """``factor(epoch)``, the multiplier of a term's weight (see the module docstring)."""

    kind: str
    epochs: float
    start: float = 0.0  # linear / cosine: the factor at epoch 0
    end: float = 1.0  # linear / cosine: the factor from ``epochs`` on

    def __call__(self, epoch: Tensor) -> Tensor:
        """The factor at ``epoch`` (a 0-d float tensor, the fractional epoch), a 0-d tensor."""
        r = torch.clamp(epoch / self.epochs, 0.0, 1.0)
        return KINDS[self.kind](self, r, epoch)

    def to_table(self) -> dict:
        """The config table that gives this schedule."""
        table = {"kind": self.kind, "epochs": self.epochs}
        if self.kind in ("linear", "cosine"):
            table.update(start=self.start, end=self.end)
        return table


def parse(raw, where: str) -> WeightSchedule:
    """A :class:`WeightSchedule` from a config's ``weight_schedule`` table; every mistake is one
    :class:`ConfigError` naming ``where`` (the dotted key) and the fix."""
    example = f'{where} = {{kind = "warmup", epochs = 20}}'
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table such as {{kind = \"warmup\", epochs = 20}} (got {raw!r}).")
    unknown = [k for k in raw if k not in KEYS]
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}' in {where}; valid keys: {', '.join(KEYS)}.")
    kind = raw.get("kind")
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), list(KINDS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"{where}.kind = {kind!r} is not a weight schedule; {hint}valid kinds: "
                          f"{', '.join(KINDS)} (e.g. {example}).")
    numbers = {}
    for key, default in (("epochs", None), ("start", 0.0), ("end", 1.0)):
        value = raw.get(key, default)
        if value is None:
            raise ConfigError(f"{where} needs epochs, the length of its {kind} in epochs (e.g. {example}).")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}.{key} must be a finite number (got {value!r}).")
        numbers[key] = float(value)
    if numbers["epochs"] <= 0:
        raise ConfigError(f"{where}.epochs must be > 0 (got {numbers['epochs']}); drop the schedule for a constant "
                          "weight.")
    if kind not in ("linear", "cosine") and ("start" in raw or "end" in raw):
        raise ConfigError(f"{where}: start and end belong to the linear and cosine kinds, not {kind!r}; remove them.")
    return WeightSchedule(kind, **numbers)
