"""``srrl``: softmax regression representation learning (Yang et al., ICLR 2021)."""

from __future__ import annotations

import attrs
import torch

from fkd import losses
from fkd.errors import ConfigError
from fkd.terms.base import (Shapes, apply_teacher_head, hyper, non_negative, register_term, teacher_head_params)
from fkd.terms.embedding import EmbeddingTerm


@register_term("srrl")
@attrs.frozen
class SoftmaxRegression(EmbeddingTerm):
    """:func:`fkd.losses.srrl` on the student's feature through a learned connector, with the teacher's own
    classifier reading that connector output.

    ``student_feature`` (a map, or a vector taken as a 1 x 1 map) goes through a 1x1 conv + BatchNorm + ReLU
    to the teacher classifier's input width (``params["connector"]``, :func:`fkd.losses.init_conv_bn`); its
    spatial mean is regressed onto the teacher feature's (``teacher_feature``: by default ``embedding``, what
    the teacher's head reads), and the teacher's head on it (``z_{s->T}``) onto the teacher's logits. The
    head is the teacher's last ``nn.Linear``, copied at ``init`` into the term's non-learnable state
    (``state["head"]``, :func:`fkd.terms.teacher_head_params`): frozen, and no teacher forward is needed, so
    the teacher's outputs can come from the cache.
    """

    summary = ("SRRL: MSE of a connected student feature to the teacher's, plus MSE of the teacher's own classifier on "
               "it to the teacher's logits (Yang et al. 2021)")
    consumes = frozenset({"student_features", "teacher_features", "teacher_logits"})
    logit_weight: float = hyper(1.0, non_negative, help="weight of the softmax-regression MSE (teacher head on the "
                                                        "connected student feature vs the teacher's logits)")
    connector_relu: bool = hyper(True, help="end the connector with a ReLU (the teacher's head reads post-ReLU "
                                            "features)")

    def check(self, shapes: Shapes) -> None:
        super().check(shapes)
        if shapes.teacher_params:
            width = teacher_head_params(shapes, "srrl")["weight"].shape[1]
            t_shape = tuple(shapes.teacher_features[self.teacher_feature])
            if t_shape[0] != width:
                raise ConfigError(f"the srrl term feeds the teacher's classifier (input width {width}) and compares "
                                  f"with teacher feature '{self.teacher_feature}' {t_shape}; name the feature the "
                                  "head reads (distill.terms.srrl.teacher_feature = 'embedding').")

    def init(self, shapes: Shapes, generator: torch.Generator) -> tuple[dict, dict]:
        head = teacher_head_params(shapes, "srrl")
        connector = losses.init_conv_bn(shapes.student_features[self.student_feature][0], head["weight"].shape[1],
                                        generator=generator)
        return {"connector": connector}, {"head": head}

    def apply(self, params, state, inputs):
        f_s = inputs.student_features[self.student_feature]
        f_s = f_s[:, :, None, None] if f_s.ndim == 2 else f_s
        connected = losses.conv_bn(f_s, params["connector"], relu=self.connector_relu)
        via_head = apply_teacher_head(state["head"], connected.mean(dim=(2, 3)))
        loss = losses.srrl(connected, inputs.teacher_features[self.teacher_feature], via_head, inputs.teacher_logits,
                           logit_weight=self.logit_weight)
        return loss, state
