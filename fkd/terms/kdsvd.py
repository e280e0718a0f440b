"""``kdsvd``: knowledge distillation with singular value decomposition (Lee et al., ECCV 2018)."""

from __future__ import annotations

import attrs

from fkd import losses
from fkd.errors import ConfigError
from fkd.terms.base import Shapes, Term, check_pair_kinds, hyper, internal, register_term


def _positive_int(inst, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be a whole number >= 1 (got {value!r})")


@register_term("kdsvd")
@attrs.frozen
class SingularValueKD(Term):
    """:func:`fkd.losses.kdsvd` over the feature pairs (two or more, shallow to deep), as mdistiller's
    ``KDSVD`` over its stage outputs (``feats[1:]``); its CIFAR-100 defaults: ``K = 1``, weight 1, CE 1.

    The student's and teacher's maps must have the same width ``W`` at each layer (mdistiller's models do).
    Values depend on the signs the SVD backend gives the teacher's singular vectors.
    """

    summary = ("KDSVD: RBF relations between consecutive layers' leading singular vectors, pairs from the term's own "
               "student_features / teacher_features (Lee et al. 2018)")
    consumes = frozenset({"student_features", "teacher_features"})
    k: int = hyper(1, _positive_int, help="singular vectors kept from the teacher (the student keeps k + 3)")
    pairs: tuple = internal()

    def check(self, shapes: Shapes) -> None:
        check_pair_kinds("kdsvd", self.pairs, shapes, spatial_only=True)
        if len(self.pairs) < 2:
            raise ConfigError("the kdsvd term relates consecutive layers: give it two or more feature pairs "
                              "(distill.terms.kdsvd.student_features / teacher_features).")
        for s, t in self.pairs:
            if shapes.student_features[s][2] != shapes.teacher_features[t][2]:
                raise ConfigError(f"the kdsvd term needs maps of equal width per layer, but student feature '{s}' is "
                                  f"{shapes.student_features[s]} and teacher feature '{t}' "
                                  f"{shapes.teacher_features[t]}; pick layers of the same resolution.")

    def apply(self, params, state, inputs):
        loss = losses.kdsvd([inputs.student_features[s] for s, _ in self.pairs],
                            [inputs.teacher_features[t] for _, t in self.pairs], k=self.k)
        return loss, state
