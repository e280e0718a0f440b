"""``feature``: FitNets hints, one learnable regressor per (student, teacher) feature pair."""

from __future__ import annotations

import attrs
import torch

from fkd import losses
from fkd.terms.base import Shapes, Term, check_pair_kinds, internal, pair_key, register_term


@register_term("feature")
@attrs.frozen
class FitNetsHint(Term):
    """Mean over pairs of :func:`fkd.losses.fitnet_hint` (Romero et al. 2015, Sec. 2.2, eq. 3).

    ``params = {"block2->layer1": {"weight": (Ct, Cs, 1, 1), "bias": (Ct,)}, ...}``: a 1x1 conv per pair
    of maps (a linear layer per pair of vectors), initialised as ``nn.Conv2d`` / ``nn.Linear`` are and
    trained with the student. The pairs come from ``distill.student_features`` / ``teacher_features``.
    """

    summary = "FitNets hint: MSE of a learned 1x1 map of each student feature onto its teacher's (Romero et al. 2015)"
    consumes = frozenset({"student_features", "teacher_features"})
    pairs: tuple = internal()

    def check(self, shapes: Shapes) -> None:
        check_pair_kinds("feature", self.pairs, shapes)

    def init(self, shapes: Shapes, generator: torch.Generator) -> tuple[dict, dict]:
        params = {}
        for s, t in self.pairs:
            s_shape, t_shape = shapes.student_features[s], shapes.teacher_features[t]
            params[pair_key(s, t)] = losses.init_regressor(
                s_shape[0], t_shape[0], generator=generator, spatial=len(s_shape) == 3)
        return params, {}

    def apply(self, params, state, inputs):
        hints = [
            losses.fitnet_hint(inputs.student_features[s], inputs.teacher_features[t], params[pair_key(s, t)])
            for s, t in self.pairs
        ]
        return torch.stack(hints).mean(), state
