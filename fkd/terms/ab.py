"""``ab``: distillation of activation boundaries formed by hidden neurons (Heo et al., AAAI 2019)."""

from __future__ import annotations

import attrs
import torch

from fkd import losses
from fkd.terms.base import Shapes, Term, hyper, internal, non_negative, pair_key, register_term
from fkd.terms.connected import check_connected_pairs, init_connectors, layer_weights


@register_term("ab")
@attrs.frozen
class ActivationBoundaries(Term):
    """:func:`fkd.losses.ab` of each connected student pre-activation against the teacher's, weighted by layer.

    Pairs: pre-ReLU features on both sides (``block2_preact``, ``layer1.preact``, ``stage2_preact``).
    ``params = {"<s>-><t>": {"weight", "bn_weight", "bn_bias"}}``: a 1x1 conv + BatchNorm connector per pair
    (:func:`fkd.losses.init_conv_bn`). The pairs are summed with the authors' weights ``2^(i - n + 1)``
    (the deepest 1). The authors' ``/ 1000 * 3`` is the method config's weight (3e-3), and their
    initialisation phase (AB alone for the first epochs, then cross-entropy) the configs' weight schedules.
    """

    summary = ("activation boundaries: margin-squared loss where a connected student pre-activation's sign "
               "disagrees with the teacher's (Heo et al. 2019)")
    consumes = frozenset({"student_features", "teacher_features"})
    margin: float = hyper(1.0, non_negative, help="margin mu of the boundary loss (the authors' 1.0)")
    pairs: tuple = internal()

    def check(self, shapes: Shapes) -> None:
        check_connected_pairs("ab", self.pairs, shapes, same_size=True)

    def init(self, shapes: Shapes, generator: torch.Generator) -> tuple[dict, dict]:
        return init_connectors(self.pairs, shapes, generator), {}

    def apply(self, params, state, inputs):
        per_pair = [w * losses.ab(losses.conv_bn(inputs.student_features[s], params[pair_key(s, t)]),
                                  inputs.teacher_features[t], margin=self.margin)
                    for w, (s, t) in zip(layer_weights(len(self.pairs)), self.pairs)]
        return torch.stack(per_pair).sum(), state
