"""``rkd``: relational KD, distance and angle relations of one feature pair (Park et al., CVPR 2019)."""

from __future__ import annotations

import attrs

from fkd import losses
from fkd.terms.base import hyper, non_negative, register_term
from fkd.terms.embedding import EmbeddingTerm


@register_term("rkd")
@attrs.frozen
class RelationalKD(EmbeddingTerm):
    """:func:`fkd.losses.rkd` on ``(student_feature, teacher_feature)``; RepDistiller trains it on the pooled
    vector with this term's weight 1 (CE weight 1)."""

    summary = "relational KD: Huber loss on normalised pairwise distances and triplet angles (Park et al. 2019)"
    sweepable = frozenset({"distance_weight", "angle_weight"})
    distance_weight: float = hyper(25.0, non_negative, help="weight of the distance-wise relation (paper: 25)")
    angle_weight: float = hyper(50.0, non_negative, help="weight of the angle-wise relation (paper: 50)")

    def apply(self, params, state, inputs):
        loss = losses.rkd(*self.embeddings(inputs), distance_weight=self.hp(inputs, "distance_weight"),
                          angle_weight=self.hp(inputs, "angle_weight"))
        return loss, state
