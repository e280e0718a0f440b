"""``mlkd``: multi-level logit distillation on a weak and a strong view (Jin et al., CVPR 2023), and ``ce_strong``,
its second cross-entropy (on the strong view)."""

from __future__ import annotations

import attrs

from fkd import losses
from fkd.terms.base import Term, hyper, positive, register_term


@register_term("mlkd")
@attrs.frozen
class MultiLevelKD(Term):
    """:func:`fkd.losses.mlkd`: instance, class and batch levels at five temperatures, on the batch's two views.

    The step draws the strong view (:mod:`fkd.data.strong`: RandAugment(2) + Cutout, batched on the device)
    from the weak batch and runs the student and, live, the teacher on it; the teacher's weak-view outputs
    may come from the cache. The authors' CIFAR-100 weights: ``CE_WEIGHT 0.1`` on each view (``ce`` and
    ``ce_strong`` terms) and ``KD_WEIGHT 0.9`` (this term's weight), T 4.
    """

    summary = ("multi-level logit KD: instance + class + batch consistency at T, 3, 5, 2, 6 on a weak and a "
               "strong view (Jin et al. 2023)")
    sweepable = frozenset({"temperature"})
    consumes = frozenset({"student_logits", "teacher_logits", "student_logits_strong", "teacher_logits_strong"})
    temperature: float = hyper(4.0, positive, help="the first of the five temperatures (T, 3, 5, 2, 6)")

    def apply(self, params, state, inputs):
        return losses.mlkd(inputs.student_logits, inputs.teacher_logits, inputs.student_logits_strong,
                           inputs.teacher_logits_strong, self.hp(inputs, "temperature")), state


@register_term("ce_strong")
@attrs.frozen
class CrossEntropyStrong(Term):
    """:func:`fkd.losses.cross_entropy` of the student's logits on the strong view of the batch
    (:mod:`fkd.data.strong`): MLKD's second cross-entropy (the authors' ``CE(weak) + CE(strong)``)."""

    summary = "cross-entropy with the labels on the strong (RandAugment) view of the batch"
    consumes = frozenset({"student_logits_strong", "labels"})

    def apply(self, params, state, inputs):
        return losses.cross_entropy(inputs.student_logits_strong, inputs.labels), state
