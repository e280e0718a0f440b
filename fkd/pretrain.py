"""The pre-phase: term state fitted on the teacher's features before the student's first step.

Some methods train a part of their loss apart from the student, first: Factor Transfer's paraphraser
learns to reconstruct the teacher's feature map (Kim et al. 2018, the authors' ``train_Paraphraser.py``)
and is then frozen while the student and its translator train. A term declares such a part with
:attr:`fkd.terms.Term.pretrain_part` (a key of its *state*, so the student's optimizer never touches it),
:meth:`~fkd.terms.Term.pretrain_settings` (epochs and SGD numbers) and
:meth:`~fkd.terms.Term.pretrain_loss`.

:func:`pretrain_terms` runs the pre-phase of every such term on a fresh train state: ``epochs`` passes over
the training set in the run's data order (augmented as the run is), the teacher live in eval mode, a pure
``grad_and_value`` step with :func:`fkd.optim.sgd`, no host sync but one per epoch for the progress line.
It is part of the run, not a stage: ``distill`` and ``sweep`` call it once, before training, when they
start fresh. Its result lives in the train state's ``objective`` entry, so the first checkpoint holds it
and a resumed run does not repeat it; a run stopped during the pre-phase has no checkpoint yet and starts
over, drawing the same batches (the pre-phase is a pure function of the seed).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import grad_and_value

from fkd import prng
from fkd.errors import ConfigError
from fkd.objective import Objective
from fkd.optim import apply_updates, sgd
from fkd.terms import TermInputs

#: folded into the run's seed for the pre-phase's data order, so it differs from the student's first epochs
PRETRAIN_SEED = 0x707265


def pretraining_terms(objective) -> list:
    """The objective's terms that have a pre-phase (a state part and more than 0 epochs)."""
    return [t for t in getattr(objective, "terms", ()) if t.term.pretrain_part and t.term.pretrain_settings().epochs > 0]


def pretrain_terms(objective: Objective, state: dict, *, teacher, teacher_vars: dict | None, source, batch_size: int,
                   seed: int, augment: bool, echo: Callable | None = None,
                   on_epoch: Callable[[str, str, int, float], None] | None = None) -> dict:
    """``state`` with each pre-phase term's ``state["objective"][term][part]`` fitted (see the module docstring).

    Args:
        objective: the run's objective.
        state: a fresh train state (:func:`fkd.step.init_train_state`); not modified.
        teacher: the teacher's template (:class:`fkd.models.Model`) and ``teacher_vars`` its variables.
        source: the training :class:`~fkd.data.batches.BatchSource`; ``batch_size``, ``seed``, ``augment``: the
            run's.
        echo: prints one line per epoch (the mean loss), or None.
        on_epoch: called after each epoch as ``on_epoch(term, part, epoch, mean_loss)`` (``epoch`` from 1), e.g.
            :meth:`fkd.log_sinks.MetricSink.pretrain`, or None.
    """
    terms = pretraining_terms(objective)
    if not terms:
        return state
    if teacher is None or teacher_vars is None:
        raise ConfigError(f"the {terms[0].name} term fits part of itself on a fixed teacher's features before the "
                          "student trains, which a moving-average teacher (teacher.source = 'ema') does not have; "
                          "use a fitted teacher, or drop the term.")
    features_fn = teacher.features_fn()
    objective_state = dict(state["objective"])
    key = prng.key_from_seed(seed)
    for t in terms:
        settings = t.term.pretrain_settings()
        part_name = t.term.pretrain_part
        part = objective_state[t.name][part_name]
        optimizer = sgd(settings.learning_rate, momentum=settings.momentum, weight_decay=settings.weight_decay)
        opt_state = optimizer.init(part)

        def step(part, opt_state, x, y, term=t.term):
            with torch.no_grad():
                features = {k: v.float() for k, v in features_fn(teacher_vars["params"], teacher_vars["buffers"],
                                                                  x).items()}
            inputs = TermInputs(None, {}, y, None, features, None, key)
            grads, loss = grad_and_value(lambda p: term.pretrain_loss(p, inputs))(part)
            updates, opt_state = optimizer.update(grads, opt_state, part)
            return apply_updates(part, updates), opt_state, loss.detach()

        for epoch in range(settings.epochs):
            total, count = None, 0
            for x, y, _ in source.batches(batch_size, shuffle=True, epoch=epoch, seed=seed ^ PRETRAIN_SEED,
                                          augment=augment):
                part, opt_state, loss = step(part, opt_state, x, y)
                total = loss if total is None else total + loss
                count += 1
            if not count:
                continue
            mean_loss = float(total) / count  # one host read per pre-phase epoch
            if echo is not None:
                echo(f"{t.name} pre-phase epoch {epoch + 1}/{settings.epochs}: {part_name} loss {mean_loss:.4f}")
            if on_epoch is not None:
                on_epoch(t.name, part_name, epoch + 1, mean_loss)
        objective_state[t.name] = {**objective_state[t.name], part_name: part}
    return {**state, "objective": objective_state}
