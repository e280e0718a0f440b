"""``logit``: Hinton et al.'s soft targets, ``T^2 KL(softmax(z_t/T) || softmax(z_s/T))``."""

from __future__ import annotations

import attrs

from fkd import losses
from fkd.terms.base import hyper, positive, register_term
from fkd.terms.heads import StudentHeadTerm, student_head_field


@register_term("logit")
@attrs.frozen
class SoftTargetKL(StudentHeadTerm):
    """:func:`fkd.losses.soft_target_kl` at temperature T (Hinton, Vinyals & Dean 2015, Sec. 2), on the
    student's logits or the head ``student_head`` names (a distilled DeiT's, see :mod:`fkd.terms.heads`)."""

    summary = "soft-target KL divergence at temperature T, times T^2 (Hinton et al. 2015)"
    sweepable = frozenset({"temperature"})
    ensemble_temperature = "temperature"
    consumes = frozenset({"student_logits", "teacher_logits"})
    temperature: float = hyper(2.0, positive, help="softmax temperature T (the loss carries the T^2 factor)")
    student_head: str = student_head_field()

    def apply(self, params, state, inputs):
        t = self.hp(inputs, "temperature")
        return losses.soft_target_kl(self.head_logits(inputs), inputs.teacher_logits, t), state
