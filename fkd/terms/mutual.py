"""``mutual``: deep mutual learning, each cohort member's mean KL from its peers (Zhang et al., CVPR 2018)."""

from __future__ import annotations

import attrs

from fkd import losses
from fkd.terms.base import Term, hyper, positive, register_term


@register_term("mutual")
@attrs.frozen
class MutualLearning(Term):
    """:func:`fkd.losses.mutual_learning_member`: ``T^2 / (K - 1) * sum_{j != k} KL(p_j || p_k)`` for member k,
    the peers detached. Needs a cohort (``[cohort] size = 2`` or more); with T = 1 it is the paper's loss."""

    summary = "deep mutual learning: each cohort member's mean KL from its peers (Zhang et al. 2018)"
    sweepable = frozenset({"temperature"})
    consumes = frozenset({"student_logits", "cohort_logits"})
    temperature: float = hyper(1.0, positive, help="softmax temperature T (the loss carries the T^2 factor; the paper: 1)")

    def apply(self, params, state, inputs):
        t = self.hp(inputs, "temperature")
        return losses.mutual_learning_member(inputs.student_logits, inputs.cohort_logits, t), state
