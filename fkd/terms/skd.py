"""``skd``: streamlined KD, an instance KL plus a Mahalanobis direction term on logits (CVPR 2026)."""

from __future__ import annotations

import attrs

from fkd import losses
from fkd.terms.base import Term, hyper, non_negative, positive, register_term


def _mode(inst, attribute, value) -> None:
    if value not in ("paper", "code"):
        raise ValueError(f"must be 'paper' (torchdistill, the paper's equations) or 'code' (the authors' "
                         f"repository) (got {value!r})")


@register_term("skd")
@attrs.frozen
class StreamlinedKD(Term):
    """``instance_weight * skd_instance + direction_weight * skd_direction`` (:func:`fkd.losses.skd_instance`,
    :func:`fkd.losses.skd_direction`), each in its own ``mode``.

    Defaults are the authors' code (github.com/HyunJunSik/StreamLined, ``Distiller/SKD.py``): T 4, Tikhonov
    0.1, both parts weight 1 inside the term, ``mode = "code"``; their CE / KD weights (0.1 / 0.9 by default,
    0.5 / 0.5 for ResNet32x4 -> ResNet8x4) are the objective's. ``"paper"`` follows torchdistill's
    ``SKDInstanceLoss`` / ``SKDDirectionLoss``.
    """

    summary = "streamlined KD: instance KL + Mahalanobis distance of logit Gram matrices (Jeong et al. 2026)"
    sweepable = frozenset({"temperature", "tikhonov", "instance_weight", "direction_weight"})
    consumes = frozenset({"student_logits", "teacher_logits"})
    temperature: float = hyper(4.0, positive, help="softmax temperature T of the instance term")
    tikhonov: float = hyper(0.1, positive, help="Tikhonov factor added to the direction term's covariance diagonal")
    instance_weight: float = hyper(1.0, non_negative, help="weight of the instance (KL) term inside skd")
    direction_weight: float = hyper(1.0, non_negative, help="weight of the direction (Mahalanobis) term inside skd")
    instance_mode: str = hyper("code", _mode, help="instance term: 'code' (authors: T^2, low-confidence share) or "
                                                   "'paper' (torchdistill)")
    direction_mode: str = hyper("code", _mode, help="direction term: 'code' (authors: Gram / K, low-confidence "
                                                    "class share) or 'paper' (torchdistill)")

    def apply(self, params, state, inputs):
        s, t = inputs.student_logits, inputs.teacher_logits
        instance = losses.skd_instance(s, t, self.hp(inputs, "temperature"), self.instance_mode)
        direction = losses.skd_direction(s, t, self.hp(inputs, "tikhonov"), self.direction_mode)
        return self.hp(inputs, "instance_weight") * instance + self.hp(inputs, "direction_weight") * direction, state
