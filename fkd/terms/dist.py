"""``dist``: DIST, Pearson-correlation matching of inter- and intra-class relations (Huang et al., NeurIPS 2022)."""

from __future__ import annotations

import attrs

from fkd import losses
from fkd.terms.base import Term, hyper, non_negative, positive, register_term


@register_term("dist")
@attrs.frozen
class DIST(Term):
    """:func:`fkd.losses.dist`. Defaults are the paper's ImageNet setting (beta = gamma = T = 1); the authors'
    CIFAR-100 config uses T = 4 with this term's weight 2 and CE weight 1."""

    summary = "DIST: 1 - Pearson correlation of softmax(z/T) across classes and across the batch (Huang et al. 2022)"
    sweepable = frozenset({"beta", "gamma", "temperature"})
    ensemble_temperature = "temperature"
    consumes = frozenset({"student_logits", "teacher_logits"})
    beta: float = hyper(1.0, non_negative, help="weight of the inter-class relation (correlation over classes)")
    gamma: float = hyper(1.0, non_negative, help="weight of the intra-class relation (correlation over the batch)")
    temperature: float = hyper(1.0, positive, help="softmax temperature T (the loss carries the T^2 factor)")

    def apply(self, params, state, inputs):
        loss = losses.dist(inputs.student_logits, inputs.teacher_logits, beta=self.hp(inputs, "beta"),
                           gamma=self.hp(inputs, "gamma"), temperature=self.hp(inputs, "temperature"))
        return loss, state
