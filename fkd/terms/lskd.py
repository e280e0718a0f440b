"""``lskd``: KD on z-scored logits (logit standardization, Sun et al., CVPR 2024)."""

from __future__ import annotations

import attrs

from fkd import losses
from fkd.terms.base import Term, hyper, positive, register_term


@register_term("lskd")
@attrs.frozen
class LogitStandardizedKD(Term):
    """:func:`fkd.losses.logit_standardized_kd`; the authors train CIFAR-100 with T = 2, this term's weight 9
    and CE weight 0.1."""

    summary = "KD on z-scored logits, T^2-scaled (Sun et al. 2024)"
    sweepable = frozenset({"temperature"})
    consumes = frozenset({"student_logits", "teacher_logits"})
    temperature: float = hyper(2.0, positive, help="softmax temperature T applied to the z-scored logits")

    def apply(self, params, state, inputs):
        t = self.hp(inputs, "temperature")
        return losses.logit_standardized_kd(inputs.student_logits, inputs.teacher_logits, t), state
