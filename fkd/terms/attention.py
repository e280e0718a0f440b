"""``attention``: attention transfer over the feature pairs (Zagoruyko & Komodakis 2017)."""

from __future__ import annotations

import attrs

from fkd import losses
from fkd.terms.base import Shapes, Term, check_pair_kinds, hyper, internal, positive, register_term


@register_term("attention")
@attrs.frozen
class AttentionTransfer(Term):
    """:func:`fkd.losses.attention_transfer`: squared distance of normalised ``sum_c |f_c|^p`` maps, summed
    over the pairs (each pair's mean over batch and positions); the paper's beta is the term's weight."""

    summary = "attention transfer between paired feature maps (Zagoruyko & Komodakis 2017)"
    sweepable = frozenset({"p"})
    consumes = frozenset({"student_features", "teacher_features"})
    p: float = hyper(2.0, positive, help="power p of the attention map sum_c |f_c|^p")
    pairs: tuple = internal()

    def check(self, shapes: Shapes) -> None:
        check_pair_kinds("attention transfer", self.pairs, shapes, spatial_only=True)

    def apply(self, params, state, inputs):
        loss = losses.attention_transfer(
            [inputs.student_features[s] for s, _ in self.pairs],
            [inputs.teacher_features[t] for _, t in self.pairs],
            p=self.hp(inputs, "p"),
        )
        return loss, state
