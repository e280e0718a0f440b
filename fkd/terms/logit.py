"""``logit``: Hinton et al.'s soft targets, ``T^2 KL(softmax(z_t/T) || softmax(z_s/T))``."""

from __future__ import annotations

import attrs

from fkd import losses
from fkd.terms.base import Term, hyper, positive, register_term


@register_term("logit")
@attrs.frozen
class SoftTargetKL(Term):
    """:func:`fkd.losses.soft_target_kl` at temperature T (Hinton, Vinyals & Dean 2015, Sec. 2)."""

    summary = "soft-target KL divergence at temperature T, times T^2 (Hinton et al. 2015)"
    sweepable = frozenset({"temperature"})
    ensemble_temperature = "temperature"
    consumes = frozenset({"student_logits", "teacher_logits"})
    temperature: float = hyper(2.0, positive, help="softmax temperature T (the loss carries the T^2 factor)")

    def apply(self, params, state, inputs):
        t = self.hp(inputs, "temperature")
        return losses.soft_target_kl(inputs.student_logits, inputs.teacher_logits, t), state
