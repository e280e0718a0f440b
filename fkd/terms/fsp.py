"""``fsp``: the flow of solution procedure between consecutive layers (Yim et al., CVPR 2017)."""

from __future__ import annotations

import attrs
import torch

from fkd import losses
from fkd.errors import ConfigError
from fkd.terms.base import Shapes, Term, check_pair_kinds, internal, register_term


@register_term("fsp")
@attrs.frozen
class FlowOfSolution(Term):
    """Sum over consecutive feature pairs ``i, i+1`` of :func:`fkd.losses.fsp`, as RepDistiller's ``FSP``.

    The pairs (``student_features`` / ``teacher_features``, the term's own or the shared ones, shallow to
    deep) give ``n - 1`` FSP matrices per side; the student's channel counts must equal the teacher's at
    each layer. RepDistiller trains FSP as an initialisation: 30 of 240 epochs on the FSP loss alone, then
    cross-entropy alone; fkd's method config does the same with weight schedules (``until`` on this term,
    ``after`` on ``ce``) in one run, the optimizer's state carried across.
    """

    summary = ("FSP: MSE of the Gram-like (C1 x C2) flow matrices between consecutive layers, pairs from the term's "
               "own student_features / teacher_features (Yim et al. 2017)")
    consumes = frozenset({"student_features", "teacher_features"})
    pairs: tuple = internal()

    def check(self, shapes: Shapes) -> None:
        check_pair_kinds("fsp", self.pairs, shapes, spatial_only=True)
        if len(self.pairs) < 2:
            raise ConfigError("the fsp term compares consecutive layers: give it two or more feature pairs "
                              "(distill.terms.fsp.student_features / teacher_features).")
        for (s, t) in self.pairs:
            if shapes.student_features[s][0] != shapes.teacher_features[t][0]:
                raise ConfigError(f"the fsp term needs equal channel counts per layer, but student feature '{s}' has "
                                  f"{shapes.student_features[s][0]} and teacher feature '{t}' "
                                  f"{shapes.teacher_features[t][0]}; pick layers of equal widths.")

    def apply(self, params, state, inputs):
        s = [inputs.student_features[name] for name, _ in self.pairs]
        t = [inputs.teacher_features[name] for _, name in self.pairs]
        flows = [losses.fsp(s[i], s[i + 1], t[i], t[i + 1]) for i in range(len(s) - 1)]
        return torch.stack(flows).sum(), state
