"""``ce``: cross-entropy with the labels, the hard-label term of every objective."""

from __future__ import annotations

import attrs

from fkd import losses
from fkd.terms.base import Term, register_term


@register_term("ce")
@attrs.frozen
class CrossEntropy(Term):
    """``-(1/L) sum_{b: y_b >= 0} log softmax(z_s)_b[y_b]`` over the L labeled examples of the batch
    (:func:`fkd.losses.cross_entropy`; unlabeled transfer-set examples carry label -1 and are masked out,
    an all-unlabeled batch gives 0); no hyper-parameters."""

    summary = "cross-entropy with the labels (labeled examples only)"
    consumes = frozenset({"student_logits", "labels"})

    def apply(self, params, state, inputs):
        return losses.cross_entropy(inputs.student_logits, inputs.labels), state
