"""``ofd``: a comprehensive overhaul of feature distillation (Heo et al., ICCV 2019)."""

from __future__ import annotations

import attrs
import torch

from fkd import losses
from fkd.errors import ConfigError
from fkd.terms.base import Shapes, Term, internal, pair_key, register_term, teacher_param
from fkd.terms.connected import check_connected_pairs, init_connectors, layer_weights


def _names(inst, attribute, value) -> None:
    if not (isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value)):
        raise ValueError(f"must be a list of BatchNorm layer names, e.g. ['layer1.1.bn2'] (got {value!r})")


@register_term("ofd")
@attrs.frozen
class OverhaulDistillation(Term):
    """:func:`fkd.losses.ofd` of each connected student pre-activation against the teacher's margin-ReLU'd
    pre-activation, weighted by layer.

    Pairs: pre-ReLU features on both sides. ``teacher_bn`` names, per pair, the teacher's BatchNorm whose
    output that ReLU reads (the authors' ``get_bn_before_relu``: ``layer1.1.bn2`` for a torchvision
    ResNet-18's ``layer1.preact``); at ``init`` its gamma and beta give the pair's margin
    (:func:`fkd.losses.ofd_margin`), a constant in the term's state: ``state = {"margins": {"<s>-><t>": (C,)}}``.
    ``params``: a 1x1 conv + BatchNorm connector per pair. Pairs are summed with the authors' weights
    ``2^(i - n + 1)``; their ``/ 1000`` is the method config's weight (1e-3, mdistiller's ``FEAT_WEIGHT``).
    """

    summary = ("overhaul of feature distillation: partial L2 between connected student pre-activations and the "
               "teacher's, margin-ReLU'd with margins from its BatchNorms (Heo et al. 2019)")
    consumes = frozenset({"student_features", "teacher_features"})
    # a list in the config, a tuple here (hashable, as a frozen term must be)
    teacher_bn: list = attrs.field(default=(), converter=tuple, validator=_names, metadata={
        "help": "per feature pair, the teacher's BatchNorm before that ReLU (its gamma and beta give the margin), "
                "e.g. ['layer1.1.bn2', 'layer2.1.bn2']"})
    pairs: tuple = internal()

    def check(self, shapes: Shapes) -> None:
        check_connected_pairs("ofd", self.pairs, shapes, same_size=False)
        if len(self.teacher_bn) != len(self.pairs):
            raise ConfigError(f"distill.terms.ofd.teacher_bn names {len(self.teacher_bn)} BatchNorm layers for "
                              f"{len(self.pairs)} feature pairs; name the teacher's BatchNorm before each pair's ReLU.")
        if shapes.teacher_params:
            for (s, t), bn in zip(self.pairs, self.teacher_bn):
                gamma = teacher_param(shapes, f"{bn}.weight", "ofd", what="BatchNorm weight")
                if gamma.shape != (shapes.teacher_features[t][0],):
                    raise ConfigError(f"distill.terms.ofd.teacher_bn '{bn}' has {tuple(gamma.shape)} channels but "
                                      f"teacher feature '{t}' has {shapes.teacher_features[t][0]}; name the BatchNorm "
                                      "that feature's ReLU reads.")

    def init(self, shapes: Shapes, generator: torch.Generator) -> tuple[dict, dict]:
        margins = {pair_key(s, t): losses.ofd_margin(teacher_param(shapes, f"{bn}.weight", "ofd"),
                                                     teacher_param(shapes, f"{bn}.bias", "ofd")).float()
                   for (s, t), bn in zip(self.pairs, self.teacher_bn)}
        return init_connectors(self.pairs, shapes, generator), {"margins": margins}

    def apply(self, params, state, inputs):
        per_pair = []
        for w, (s, t) in zip(layer_weights(len(self.pairs)), self.pairs):
            key = pair_key(s, t)
            connected = losses.conv_bn(inputs.student_features[s], params[key])
            per_pair.append(w * losses.ofd(connected, inputs.teacher_features[t], state["margins"][key]))
        return torch.stack(per_pair).sum(), state
