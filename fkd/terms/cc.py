"""``cc``: correlation congruence on one feature pair (Peng et al., ICCV 2019)."""

from __future__ import annotations

import attrs

from fkd import losses
from fkd.terms.base import hyper, non_negative, positive, register_term
from fkd.terms.embedding import EmbeddingTerm


def _int(inst, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer (got {value!r})")


@register_term("cc")
@attrs.frozen
class CorrelationCongruence(EmbeddingTerm):
    """:func:`fkd.losses.correlation_congruence` on ``(student_feature, teacher_feature)``: Frobenius distance
    of Taylor-expanded Gaussian-RBF correlation matrices / B^2 (torchdistill's CCKD; gamma 0.4, order 2)."""

    summary = "correlation congruence: distance of Gaussian-RBF correlation matrices of the batch (Peng et al. 2019)"
    sweepable = frozenset({"gamma"})
    gamma: float = hyper(0.4, positive, help="Gaussian RBF width gamma in exp(-gamma |x - y|^2)")
    order: int = hyper(2, _int, non_negative, help="order P of the kernel's Taylor expansion (P + 1 terms)")

    def apply(self, params, state, inputs):
        loss = losses.correlation_congruence(*self.embeddings(inputs), gamma=self.hp(inputs, "gamma"),
                                             order=self.order)
        return loss, state
