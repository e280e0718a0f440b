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

    Token sequences ``(N, D)`` (a transformer's, e.g. a ViT's ``blocks.3``): a linear regressor over D
    (``{"weight": (Dt, Ds), "bias": (Dt,)}``) applied to every token; a map on the other side is read as
    its ``H*W`` tokens of width C, and prefix tokens (class, distillation) beyond the other side's count
    are dropped (:func:`fkd.losses.token_pair`). So a CNN teacher's ``layer1`` (64, 8, 8) teaches a ViT
    student's ``blocks.1`` (65, 192) at 32 px with 4 px patches: 64 patch tokens against 64 positions.
    """

    summary = "FitNets hint: MSE of a learned 1x1 map of each student feature onto its teacher's (Romero et al. 2015)"
    consumes = frozenset({"student_features", "teacher_features"})
    pairs: tuple = internal()

    def check(self, shapes: Shapes) -> None:
        check_pair_kinds("feature", self.pairs, shapes, tokens=True)

    def init(self, shapes: Shapes, generator: torch.Generator) -> tuple[dict, dict]:
        params = {}
        for s, t in self.pairs:
            s_shape, t_shape = shapes.student_features[s], shapes.teacher_features[t]
            if 2 in (len(s_shape), len(t_shape)):  # tokens: a linear map of each token's width
                params[pair_key(s, t)] = losses.init_regressor(
                    _width(s_shape), _width(t_shape), generator=generator, spatial=False)
                continue
            params[pair_key(s, t)] = losses.init_regressor(
                s_shape[0], t_shape[0], generator=generator, spatial=len(s_shape) == 3)
        return params, {}

    def apply(self, params, state, inputs):
        hints = [
            losses.fitnet_hint(*_as_pair(inputs.student_features[s], inputs.teacher_features[t]), params[pair_key(s, t)])
            for s, t in self.pairs
        ]
        return torch.stack(hints).mean(), state


def _width(shape) -> int:
    """A token's width: D of ``(N, D)``, C of a ``(C, H, W)`` map read as tokens."""
    return shape[-1] if len(shape) == 2 else shape[0]


def _as_pair(student: torch.Tensor, teacher: torch.Tensor):
    """The pair as the regressor reads it: both as tokens when either is a token sequence ``(B, N, D)``."""
    if student.ndim == 3 or teacher.ndim == 3:
        return losses.token_pair(student, teacher)
    return student, teacher
