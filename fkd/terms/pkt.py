"""``pkt``: probabilistic knowledge transfer on one feature pair (Passalis & Tefas, ECCV 2018)."""

from __future__ import annotations

import attrs

from fkd import losses
from fkd.terms.base import hyper, positive, register_term
from fkd.terms.embedding import EmbeddingTerm


@register_term("pkt")
@attrs.frozen
class ProbabilisticKT(EmbeddingTerm):
    """:func:`fkd.losses.pkt` on ``(student_feature, teacher_feature)``; RepDistiller trains it on the pooled
    vector with this term's weight 30000 (CE weight 1)."""

    summary = "probabilistic knowledge transfer: KL of cosine-kernel conditional probabilities (Passalis & Tefas 2018)"
    eps: float = hyper(1e-7, positive, help="epsilon added to the norms and inside the log")

    def apply(self, params, state, inputs):
        return losses.pkt(*self.embeddings(inputs), eps=self.eps), state
