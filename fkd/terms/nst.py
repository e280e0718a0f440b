"""``nst``: neuron selectivity transfer over the feature pairs (Huang & Wang 2017)."""

from __future__ import annotations

import attrs
import torch

from fkd import losses
from fkd.terms.base import Shapes, Term, check_pair_kinds, internal, register_term


@register_term("nst")
@attrs.frozen
class NeuronSelectivityTransfer(Term):
    """:func:`fkd.losses.nst` summed over the pairs ``distill.student_features[i]`` /
    ``distill.teacher_features[i]`` (RepDistiller sums its pairs; it trains with this term's weight 50)."""

    summary = ("neuron selectivity transfer: MMD of channel maps with a squared polynomial kernel, on the pairs "
               "distill.student_features[i] / teacher_features[i] (Huang & Wang 2017)")
    consumes = frozenset({"student_features", "teacher_features"})
    pairs: tuple = internal()

    def check(self, shapes: Shapes) -> None:
        check_pair_kinds("nst", self.pairs, shapes, spatial_only=True)

    def apply(self, params, state, inputs):
        per_pair = [losses.nst(inputs.student_features[s], inputs.teacher_features[t]) for s, t in self.pairs]
        return torch.stack(per_pair).sum(), state
