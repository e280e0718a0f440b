"""``reviewkd``: distilling knowledge via knowledge review (Chen et al., CVPR 2021)."""

from __future__ import annotations

import attrs
import torch

from fkd import losses
from fkd.errors import ConfigError
from fkd.terms.base import Shapes, Term, hyper, internal, pair_key, register_term


def _positive_int(inst, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be a whole number >= 1 (got {value!r})")


def _as_map(shape: tuple) -> tuple:
    return tuple(shape) if len(shape) == 3 else (shape[0], 1, 1)


@register_term("reviewkd")
@attrs.frozen
class KnowledgeReview(Term):
    """:func:`fkd.losses.hcl` between the student's features fused by ReviewKD's ABF modules and the teacher's.

    Pairs (``student_features`` / ``teacher_features``, shallow to deep; a ``(D,)`` vector such as
    ``embedding`` enters as a ``D x 1 x 1`` map, as the authors feed the pooled feature): one ABF per pair
    (:func:`fkd.losses.init_abf`, ``params = {"<s>-><t>": {...}}``), ``in`` = the student's channels,
    ``mid = min(max_mid_channels, C_last)`` (``C_last`` the deepest student feature's channels), ``out`` = the
    teacher's channels. The deepest level is transformed alone; every shallower one is fused with the level
    below it (the review path), and each output is resized to its teacher map's size. The authors' CIFAR-100
    setting: the teacher's pre-ReLU stage features plus its pooled feature, the student's stage outputs plus
    its pooled feature, weight 1 (5 for resnet32x4 -> resnet8x4) with a 20-epoch linear warm-up -- the
    warm-up is this term's ``weight_schedule``.
    """

    summary = ("ReviewKD: hierarchical context loss between the teacher's features and the student's, fused deep to "
               "shallow by learned attention-based fusion (ABF) modules (Chen et al. 2021)")
    consumes = frozenset({"student_features", "teacher_features"})
    max_mid_channels: int = hyper(512, _positive_int, help="cap on the ABF modules' middle width (the authors' 512)")
    pairs: tuple = internal()

    def check(self, shapes: Shapes) -> None:
        if not self.pairs:
            raise ConfigError("the reviewkd term matches features: set distill.terms.reviewkd.student_features and "
                              "teacher_features (shallow to deep, e.g. ['block2', 'block3', 'embedding']).")
        for s, t in self.pairs:
            for side, name, shape in (("student", s, shapes.student_features[s]),
                                      ("teacher", t, shapes.teacher_features[t])):
                if len(shape) not in (1, 3):
                    raise ConfigError(f"the reviewkd term needs (C, H, W) maps or (D,) vectors, but {side} feature "
                                      f"'{name}' is {tuple(shape)}; pick another feature.")

    def _mid(self, shapes: Shapes) -> int:
        return min(self.max_mid_channels, shapes.student_features[self.pairs[-1][0]][0])

    def init(self, shapes: Shapes, generator: torch.Generator) -> tuple[dict, dict]:
        mid, last = self._mid(shapes), len(self.pairs) - 1
        params = {pair_key(s, t): losses.init_abf(shapes.student_features[s][0], mid, shapes.teacher_features[t][0],
                                                  fuse=i < last, generator=generator)
                  for i, (s, t) in enumerate(self.pairs)}
        return params, {}

    def apply(self, params, state, inputs):
        outputs, residual = [], None
        for s, t in reversed(self.pairs):  # deep to shallow: each level reviews the one below it
            teacher = inputs.teacher_features[t]
            out_size = tuple(_as_map(tuple(teacher.shape[1:]))[1:])
            out, residual = losses.abf(inputs.student_features[s], residual, params[pair_key(s, t)], out_size)
            outputs.insert(0, out)
        teachers = [inputs.teacher_features[t] for _, t in self.pairs]
        teachers = [f[:, :, None, None] if f.ndim == 2 else f for f in teachers]
        return losses.hcl(outputs, teachers), state
