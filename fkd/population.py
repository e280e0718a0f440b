"""A population: K models trained together by one step (a sweep's students; next, a cohort).

Every member has its own train state -- initialisation, random key, optimizer hyper-parameters (0-d
tensors in its optimizer state, see :mod:`fkd.optim`) and term numbers (``state["hyper"]``) -- and all
members share one per-member step function (:func:`fkd.step.make_train_step`). Because their states
differ in values only, never in structure, one traced or compiled step serves them all. Two strategies
run it:

* ``vmap``: the members' states are stacked on a leading axis and ``torch.func.vmap(step)`` trains them
  at once -- the win on a GPU, where one small model leaves the device mostly idle;
* ``loop``: the population's state is the list of member states and the same step is called once per
  member -- on a CPU, where vmap turns convolutions into grouped convolutions and was measured slower
  (``python cli.py bench --sweep K``; docs/sweeps.md).

``auto`` picks ``vmap`` on CUDA and ``loop`` elsewhere. Batches are per member (stacked for vmap) unless
``shared_batch``: then every member sees the same batch (``in_dims=None``: a live teacher runs once).

:func:`freeze_diverged` is the population's non-finite policy, a wrapper around the member step: a member
whose loss, gradients or update turn non-finite keeps its last good state from then on and the others go
on (a plain run stops instead: :func:`fkd.loop.run_epochs`).
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
import torch

from fkd.errors import FkdError
from fkd.optim import global_norm
from fkd.pytree import tree_map
from fkd.step import keep_finite

STRATEGIES = ("auto", "vmap", "loop")


def choose_strategy(requested: str, device: torch.device) -> str:
    """``auto`` -> ``vmap`` on CUDA, ``loop`` elsewhere (measured: ``python cli.py bench --sweep K``)."""
    if requested not in STRATEGIES:
        raise FkdError(f"--strategy must be one of {', '.join(STRATEGIES)} (got {requested!r}).")
    if requested != "auto":
        return requested
    return "vmap" if torch.device(device).type == "cuda" else "loop"


def freeze_diverged(step: Callable) -> Callable:
    """Wrap a member step so that a member that diverged once stays frozen at its last good state.

    Non-finite means: the loss or the gradients (the step's ``finite`` metric), or the new parameters --
    a member's own learning rate can overflow the update while its gradients are finite. The first such
    step's index goes to ``bad_step`` and from then on params, buffers, objective and optimizer states
    stay as they were (``torch.where``, no host sync); ``step`` keeps counting so the member stays in
    lockstep with the others.
    """

    def frozen_step(state: dict, batch: Any, teacher_vars: dict | None = None):
        new_state, metrics = step(state, batch, teacher_vars)
        finite = metrics["finite"] & torch.isfinite(global_norm(new_state["params"]))
        # the step's own guard, with "finite" narrowed to members that never diverged (bad_step is set on
        # the first non-finite step alone, since (bad_step < 0) & ~alive == (bad_step < 0) & ~finite)
        alive = (state["bad_step"] < 0) & finite
        return keep_finite(state, new_state, alive), {**metrics, "finite": finite}

    return frozen_step


def stack(states: list) -> Any:
    """Member pytrees stacked on a new leading axis."""
    return tree_map(lambda *xs: torch.stack(xs), *states)


def unstack(stacked: Any, k: int) -> list:
    """The ``k`` members of a stacked pytree."""
    return [tree_map(lambda t, i=i: t[i], stacked) for i in range(k)]


@attrs.frozen
class Population:
    """How K members are stepped together: ``strategy`` ``"vmap"`` (stacked state) or ``"loop"`` (a list of
    member states), with one batch per member or one ``shared_batch`` for all."""

    size: int
    strategy: str = "loop"
    shared_batch: bool = False

    def __attrs_post_init__(self) -> None:
        if self.strategy not in ("vmap", "loop"):
            raise ValueError(f"a population's strategy is 'vmap' or 'loop' (got {self.strategy!r})")

    def wrap(self, member_step: Callable) -> Callable:
        """``step(states, batches, teacher_vars) -> (states, metrics)`` over the whole population.

        ``batches`` is one batch (``shared_batch``) or a list of ``size`` batches; metrics come back stacked
        on a leading axis of ``size`` either way. Compile the result, not the member step, for vmap.
        """
        if self.strategy == "vmap":
            vmapped = torch.func.vmap(member_step, in_dims=(0, None if self.shared_batch else 0, None))

            def vmap_step(states, batches, teacher_vars=None):
                batch = batches if self.shared_batch else stack(batches)
                return vmapped(states, batch, teacher_vars)

            return vmap_step

        def loop_step(states, batches, teacher_vars=None):
            batches = [batches] * self.size if self.shared_batch else batches
            out = [member_step(st, b, teacher_vars) for st, b in zip(states, batches)]
            return [o[0] for o in out], stack([o[1] for o in out])

        return loop_step

    def members(self, states) -> list:
        """The member states, in order."""
        return unstack(states, self.size) if self.strategy == "vmap" else list(states)

    def gather(self, members: list):
        """The population's state from its member states (the inverse of :meth:`members`)."""
        return stack(members) if self.strategy == "vmap" else list(members)

    def bad_steps(self, states) -> torch.Tensor:
        """``(size,)`` int64: each member's first non-finite step, -1 while it is well."""
        if self.strategy == "vmap":
            return states["bad_step"]
        return torch.stack([st["bad_step"] for st in states])
