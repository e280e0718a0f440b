"""Shared by the terms whose student features pass a learnable conv + BatchNorm connector to the teacher's
channels (AB, OFD): per-pair connector parameters and the authors' layer weights ``2^(i - n + 1)``."""

from __future__ import annotations

import torch

from fkd import losses
from fkd.errors import ConfigError
from fkd.terms.base import Shapes, check_pair_kinds, pair_key


def check_connected_pairs(term: str, pairs: tuple, shapes: Shapes, *, same_size: bool) -> None:
    """Maps on both sides; with ``same_size`` the student's and teacher's ``H x W`` must agree."""
    check_pair_kinds(term, pairs, shapes, spatial_only=True)
    if not same_size:
        return
    for s, t in pairs:
        if tuple(shapes.student_features[s][1:]) != tuple(shapes.teacher_features[t][1:]):
            raise ConfigError(f"the {term} term compares maps of one size, but student feature '{s}' is "
                              f"{tuple(shapes.student_features[s])} and teacher feature '{t}' "
                              f"{tuple(shapes.teacher_features[t])}; pick layers of the same resolution.")


def init_connectors(pairs: tuple, shapes: Shapes, generator: torch.Generator) -> dict:
    """``{"<s>-><t>": conv + BN params}`` mapping each student feature's channels onto its teacher's."""
    return {pair_key(s, t): losses.init_conv_bn(shapes.student_features[s][0], shapes.teacher_features[t][0],
                                                generator=generator) for s, t in pairs}


def layer_weights(n: int) -> list[float]:
    """``[2^(1-n), ..., 1/2, 1]``: the deepest pair weighs 1, each shallower one half the next (the AB and OFD
    authors' code)."""
    return [2.0 ** (i - n + 1) for i in range(n)]
