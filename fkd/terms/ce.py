"""``ce``: cross-entropy with the labels, the hard-label term of every objective."""

from __future__ import annotations

import attrs

from fkd import losses
from fkd.terms.base import Term, register_term


@register_term("ce")
@attrs.frozen
class CrossEntropy(Term):
    """``-(1/B) sum_b log softmax(z_s)_b[y_b]`` (:func:`fkd.losses.cross_entropy`); no hyper-parameters."""

    summary = "cross-entropy with the labels"
    consumes = frozenset({"student_logits", "labels"})

    def apply(self, params, state, inputs):
        return losses.cross_entropy(inputs.student_logits, inputs.labels), state
