"""``ickd``: inter-channel correlation KD with the authors' student embedding (Liu et al., ICCV 2021)."""

from __future__ import annotations

import math

import attrs
import torch

from fkd import losses
from fkd.errors import ConfigError
from fkd.terms.base import Shapes, Term, check_pair_kinds, internal, pair_key, register_term


@register_term("ickd")
@attrs.frozen
class InterChannelCorrelation(Term):
    """:func:`fkd.losses.ickd` of ``embed(f_s)`` and ``f_t``, summed over the feature pairs.

    ``params[pair] = {"weight": (C_t, C_s), "gamma", "beta": (C_t,)}``: the authors' ``Embed`` (a bias-free
    1x1 convolution to the teacher's channels, then BatchNorm2d with the batch's statistics), trained with the
    student (:func:`fkd.losses.conv_bn_embed`). The authors' CIFAR-100 setting (``-a 0 -b 2.5``): CE 1 + 2.5
    ICKD on the last stage's map (their ``feat[-2]``), no KD.
    """

    summary = "inter-channel correlation KD: row-normalised C x C Gram matrices of embedded maps (Liu et al. 2021)"
    consumes = frozenset({"student_features", "teacher_features"})
    pairs: tuple = internal()

    def check(self, shapes: Shapes) -> None:
        check_pair_kinds("ickd", self.pairs, shapes, spatial_only=True)
        for s, t in self.pairs:
            s_hw, t_hw = tuple(shapes.student_features[s][1:]), tuple(shapes.teacher_features[t][1:])
            if s_hw != t_hw:
                raise ConfigError(f"ickd matches student feature '{s}' {s_hw} with teacher feature '{t}' {t_hw}: its "
                                  "1x1 embedding keeps the spatial size, so pick maps of equal size.")

    def init(self, shapes: Shapes, generator: torch.Generator) -> tuple[dict, dict]:
        params = {}
        for s, t in self.pairs:
            c_s, c_t = shapes.student_features[s][0], shapes.teacher_features[t][0]
            bound = 1.0 / math.sqrt(c_s)  # PyTorch's default Conv2d initialisation (fan_in = C_s for 1x1)
            params[pair_key(s, t)] = {"weight": (torch.rand((c_t, c_s), generator=generator) * 2 - 1) * bound,
                                      "gamma": torch.ones(c_t), "beta": torch.zeros(c_t)}
        return params, {}

    def apply(self, params, state, inputs):
        per_pair = [losses.ickd(losses.conv_bn_embed(inputs.student_features[s], params[pair_key(s, t)]),
                                inputs.teacher_features[t]) for s, t in self.pairs]
        return torch.stack(per_pair).sum(), state
