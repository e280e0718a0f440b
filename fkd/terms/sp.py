"""``sp``: similarity-preserving KD on one student and one teacher feature (Tung & Mori, ICCV 2019)."""

from __future__ import annotations

import attrs

from fkd import losses
from fkd.terms.base import register_term
from fkd.terms.embedding import EmbeddingTerm


@register_term("sp")
@attrs.frozen
class SimilarityPreserving(EmbeddingTerm):
    """:func:`fkd.losses.similarity_preserving` on ``(student_feature, teacher_feature)``, flattened per
    example. RepDistiller applies it to the last block's map with weight 3000 (CE weight 1)."""

    summary = "similarity-preserving KD: distance of the batch's row-normalised Gram matrices (Tung & Mori 2019)"

    def apply(self, params, state, inputs):
        return losses.similarity_preserving(*self.embeddings(inputs)), state
