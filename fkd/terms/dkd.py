"""``dkd``: decoupled knowledge distillation (Zhao et al., CVPR 2022), with the authors' optional warm-up."""

from __future__ import annotations

import attrs

from fkd import losses
from fkd.terms.base import Term, hyper, non_negative, positive, register_term


@register_term("dkd")
@attrs.frozen
class DecoupledKD(Term):
    """:func:`fkd.losses.dkd`: ``alpha TCKD + beta NCKD`` at temperature T, averaged over the labeled examples.

    Examples with label ``-1`` (an unlabeled transfer set) are left out by a masked mean, since both
    parts need the target class. With ``warmup_epochs = w > 0`` the loss is scaled by
    ``min(epoch / w, 1)``, ``epoch`` being the fractional epoch count of the step (mdistiller's
    ``min(epoch / warmup, 1)``, which steps once per epoch; here it ramps every step): the key is kept as
    shorthand for ``weight_schedule = {kind = "warmup", epochs = w}``, which the objective applies to the
    term's weight (:mod:`fkd.terms.weight_schedule`). The authors
    train CIFAR-100 with CE weight 1, alpha 1, beta 8, T 4 and a 20-epoch warm-up.
    """

    summary = "decoupled KD: alpha * target-class KD + beta * non-target-class KD, T^2-scaled (Zhao et al. 2022)"
    sweepable = frozenset({"alpha", "beta", "temperature"})
    ensemble_temperature = "temperature"
    consumes = frozenset({"labels", "student_logits", "teacher_logits"})
    alpha: float = hyper(1.0, non_negative, help="weight of TCKD, the KL of the binary (target, rest) distributions")
    beta: float = hyper(8.0, non_negative, help="weight of NCKD, the KL among the non-target classes")
    temperature: float = hyper(4.0, positive, help="softmax temperature T (both parts carry the T^2 factor)")
    warmup_epochs: float = hyper(0.0, non_negative,
                                 help="ramp the loss in linearly over this many epochs (0: off; the authors use 20 "
                                      "on CIFAR-100); shorthand for weight_schedule = {kind = \"warmup\", epochs = w}")

    def apply(self, params, state, inputs):
        loss = losses.dkd(inputs.student_logits, inputs.teacher_logits, inputs.labels,
                          alpha=self.hp(inputs, "alpha"), beta=self.hp(inputs, "beta"),
                          temperature=self.hp(inputs, "temperature"))
        return loss, state

    def weight_schedule(self) -> dict | None:
        return {"kind": "warmup", "epochs": self.warmup_epochs} if self.warmup_epochs > 0 else None
