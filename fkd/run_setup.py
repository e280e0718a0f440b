"""One run setup: the optimizer, schedule, train state, step and loop spec of a training run.

``fkd teacher``, ``fkd distill`` and ``fkd bench`` all train a model with an objective; each used to
assemble these pieces on its own. :func:`build_training` is now the one place, so a setting from the
config (``train.precision``, ``train.channels_last``, the optimizer's keys) reaches the step the same
way for all three.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
import torch

from fkd import distributed
from fkd.config import TrainConfig
from fkd.data_parallel import DataParallel
from fkd.errors import ConfigError
from fkd.models.sync_batchnorm import with_synced_batchnorm
from fkd.pytree import tree_leaves
from fkd.loop import LoopSpec
from fkd.objective import Objective
from fkd.optim import GradientTransformation, hyperparams, optimizer_from_config
from fkd.schedules import Schedule, current_lr
from fkd.step import init_train_state, make_train_step, to_channels_last


def _same_layout(tree: Any) -> Any:
    return tree


def uses_channels_last(train: TrainConfig, device: torch.device | str) -> bool:
    """``train.channels_last`` applies on CUDA only (on CPUs NHWC convolutions are not faster)."""
    return train.channels_last and torch.device(device).type == "cuda"


@attrs.frozen(eq=False)
class TrainingSetup:
    """What a training loop needs, built from the config once.

    ``layout`` converts a pytree to the step's memory layout (``channels_last`` on CUDA when asked, else
    the identity): apply it once to anything passed to every step (``teacher_vars``), so the step's own
    conversion is a no-op.
    """

    optimizer: GradientTransformation
    schedule: Schedule
    state: dict
    step: Callable
    spec: LoopSpec
    layout: Callable
    channels_last: bool

    def learning_rate(self, state: dict) -> float:
        """The learning rate the next step will use, from the numbers in the optimizer state (a host sync:
        call it at epoch ends only)."""
        return current_lr(self.schedule, state["step"], hyperparams(state["opt_state"]).get("learning_rate"))


def for_this_world(model, train: TrainConfig, objective_state: dict | None, *, batch_size: int, train_mode: bool):
    """``(model, data_parallel)`` for this process: as given in a single process; under torchrun the
    step's :class:`~fkd.data_parallel.DataParallel` and, with ``train.sync_batchnorm`` (the default),
    the model with synchronised BatchNorm in its train template (:mod:`fkd.models.sync_batchnorm`).

    Refused under torchrun: a global batch smaller than the process count, and loss terms with state
    (a memory bank), which each rank would update from its own slice only.
    """
    world = distributed.world()
    if not world.parallel:
        return model, None
    world.check_batch(batch_size)
    stateful = [name for name, st in (objective_state or {}).items() if tree_leaves(st)]
    if stateful:
        raise ConfigError(f"loss term '{stateful[0]}' keeps state across steps, which data-parallel training "
                          "does not yet share between processes; run it in one process (without torchrun).")
    if train.sync_batchnorm and train_mode:
        model = with_synced_batchnorm(model, world.group_name, world.rank, world.size)
    return model, DataParallel(world.group_name, batch_size)


def build_training(
    model,
    objective: Objective,
    train: TrainConfig,
    *,
    params: dict,
    buffers: dict,
    steps_per_epoch: int,
    batch_size: int,
    seed: int,
    augment: bool,
    device: torch.device,
    label: str = "student",
    frozen: dict | None = None,
    objective_params: dict | None = None,
    objective_state: dict | None = None,
    teacher=None,
    train_mode: bool = True,
    optimizer_key: str = "train.optimizer",
    compile: str | None = None,
    quiet: bool = False,
    mix: Callable | None = None,
    split_batches: bool = True,
    ema_decay: float | None = None,
    strong_view: Callable | None = None,
) -> TrainingSetup:
    """Optimizer and schedule (from ``train.optimizer``), initial state, step and loop spec of one run.

    Args:
        model: the model being trained; ``params`` are its trainable weights, ``frozen`` the ones used
            but never updated (a linear probe's backbone), ``buffers`` its BatchNorm statistics.
        objective: the loss; ``objective_params`` / ``objective_state`` from its ``init``.
        train: ``train`` (student) or ``teacher.train``; ``optimizer_key`` names its optimizer table in
            error messages.
        steps_per_epoch: optimizer steps per epoch (:func:`fkd.loop.steps_per_epoch`): the schedule
            spans ``steps_per_epoch * train.epochs``.
        seed: the run's seed: data order, augmentation and the step's random key.
        augment: whether the training view is random (:attr:`fkd.data.DataBundle.augments`).
        teacher: the teacher's template when the step runs it live (None with cached outputs).
        compile: overrides ``train.compile`` (the bench times eager and compiled steps side by side).
        mix: the step's image mixing for function matching (:func:`fkd.mixup.make_mixer`), or None.
        ema_decay: a mean teacher's decay (``teacher.source = "ema"``): the state keeps the moving average
            of the weights and the step reads its teacher from it (:func:`fkd.step.make_train_step`).
        strong_view: the step's second view for terms that read one (:func:`fkd.data.strong.strong_view_for`).
        split_batches: under torchrun, split each batch over the ranks (:func:`for_this_world`); False
            when every rank trains models of its own (a sweep's students).
    """
    optimizer, schedule = optimizer_from_config(train.optimizer, max(steps_per_epoch, 1), train.epochs,
                                                key=optimizer_key)
    data_parallel = None
    if split_batches:
        model, data_parallel = for_this_world(model, train, objective_state, batch_size=batch_size,
                                              train_mode=train_mode)
    channels_last = uses_channels_last(train, device)
    layout = to_channels_last if channels_last else _same_layout
    state = layout(init_train_state(params, buffers, optimizer, objective_params=objective_params,
                                    objective_state=objective_state, frozen=frozen, seed=seed,
                                    ema=ema_decay is not None))
    step = make_train_step(model, objective, optimizer, teacher=teacher, train_mode=train_mode,
                           precision=train.precision, compile=train.compile if compile is None else compile,
                           compile_mode=train.compile_mode, channels_last=channels_last, device=device,
                           steps_per_epoch=max(steps_per_epoch, 1), data_parallel=data_parallel, mix=mix,
                           ema_decay=ema_decay, strong_view=strong_view)
    spec = LoopSpec(label, train.epochs, batch_size, seed, augment, train.log_every, train.checkpoint_every, quiet,
                    precision=train.precision)
    return TrainingSetup(optimizer, schedule, state, step, spec, layout, channels_last)
