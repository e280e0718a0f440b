"""``hard_kd``: DeiT's hard-label distillation, cross-entropy with the teacher's argmax (Touvron et al. 2021)."""

from __future__ import annotations

import math

import attrs

from fkd import losses
from fkd.terms.base import hyper, register_term
from fkd.terms.heads import StudentHeadTerm, student_head_field


def _fraction(inst, attribute, value) -> None:
    if not (0 <= value <= 1 and math.isfinite(value)):
        raise ValueError(f"must be within [0, 1] (got {value!r})")


@register_term("hard_kd")
@attrs.frozen
class HardLabelKD(StudentHeadTerm):
    """:func:`fkd.losses.hard_label_kd`: ``CE(z_s, argmax z_t)`` (Touvron et al., ICML 2021, Sec. 4, eq. 3).

    DeiT's recipe is ``ce`` (weight 0.5) on the class token's head and ``hard_kd`` (weight 0.5) with
    ``student_head = "head_dist"`` on the distillation token's head (see :mod:`fkd.terms.heads`); on any
    other student it reads the logits.
    """

    summary = "hard-label distillation: cross-entropy with the teacher's argmax class (Touvron et al. 2021, DeiT)"
    sweepable = frozenset({"label_smoothing"})
    consumes = frozenset({"student_logits", "teacher_logits"})
    label_smoothing: float = hyper(0.0, _fraction, help="label smoothing eps of the teacher's hard label (DeiT: 0)")
    student_head: str = student_head_field()

    def apply(self, params, state, inputs):
        return losses.hard_label_kd(self.head_logits(inputs), inputs.teacher_logits,
                                    self.hp(inputs, "label_smoothing")), state
