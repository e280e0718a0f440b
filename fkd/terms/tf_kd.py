"""``tf_kd``: teacher-free KD's virtual teacher, a label-smoothing-like regulariser (Yuan et al., CVPR 2020)."""

from __future__ import annotations

import attrs

from fkd import losses
from fkd.terms.base import Term, hyper, positive, register_term


def _probability(inst, attribute, value) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"must be in (0, 1) (got {value!r})")


@register_term("tf_kd")
@attrs.frozen
class TeacherFreeKD(Term):
    """:func:`fkd.losses.tf_kd_regularization`: KL from a virtual teacher built from the label; no teacher
    network. The authors' CIFAR-100 ResNet-18 setting (``params.json``): T 20, ``reg_alpha`` 0.1,
    ``multiplier`` 100, i.e. ``0.9 CE + 10 * tf_kd``."""

    summary = "teacher-free KD: KL to a virtual teacher softmax(u / T), u 0.99 at the label (Yuan et al. 2020)"
    sweepable = frozenset({"temperature"})
    consumes = frozenset({"student_logits", "labels"})
    temperature: float = hyper(20.0, positive, help="temperature T that softens the virtual teacher")
    correct_prob: float = hyper(0.99, _probability, help="the virtual teacher's probability of the labelled class")

    def apply(self, params, state, inputs):
        return losses.tf_kd_regularization(inputs.student_logits, inputs.labels, self.hp(inputs, "temperature"),
                                           self.correct_prob), state
