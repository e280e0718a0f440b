"""``pad``: prime-aware adaptive distillation, an L2 hint weighted by a learned variance (Zhang et al. 2020)."""

from __future__ import annotations

import math

import attrs
import torch

from fkd import losses
from fkd.terms.base import Shapes, hyper, positive, register_term
from fkd.terms.embedding import EmbeddingTerm


def _linear(d_in: int, d_out: int, generator: torch.Generator) -> dict:
    bound = 1.0 / math.sqrt(d_in)  # PyTorch's default nn.Linear initialisation
    return {"weight": (torch.rand((d_out, d_in), generator=generator) * 2 - 1) * bound,
            "bias": (torch.rand((d_out,), generator=generator) * 2 - 1) * bound}


@register_term("pad")
@attrs.frozen
class PrimeAwareDistillation(EmbeddingTerm):
    """:func:`fkd.losses.pad_l2` on ``(student_feature, teacher_feature)`` as ``(B, D)`` vectors (maps are
    global-average-pooled, as the ``avgpool`` output torchdistill reads).

    ``params = {"variance": {weight, bias, gamma, beta}}``: torchdistill's variance branch
    ``BatchNorm1d(Linear(D_s, D_t))`` on the student's vector, giving the log-variance per example and
    dimension (:func:`fkd.losses.variance_branch`), and, when ``D_s != D_t``, ``"connector"``: a linear map
    of the student's vector to the teacher's width (torchdistill pairs equal widths and has none). Both
    train with the student. torchdistill's ImageNet sample: CE 1 + PAD-L2 1, eps 1e-6.
    """

    summary = "prime-aware adaptive distillation: L2 hint divided by a learned variance, + log-variance (Zhang et al. 2020)"
    eps: float = hyper(1e-6, positive, help="added to the learned variance")

    def _dims(self, shapes: Shapes) -> tuple[int, int]:
        return shapes.student_features[self.student_feature][0], shapes.teacher_features[self.teacher_feature][0]

    def init(self, shapes: Shapes, generator: torch.Generator) -> tuple[dict, dict]:
        d_s, d_t = self._dims(shapes)
        params = {"variance": {**_linear(d_s, d_t, generator), "gamma": torch.ones(d_t), "beta": torch.zeros(d_t)}}
        if d_s != d_t:
            params["connector"] = _linear(d_s, d_t, generator)
        return params, {}

    @staticmethod
    def _vector(f: torch.Tensor) -> torch.Tensor:
        return f.mean(dim=(-2, -1)) if f.ndim == 4 else f.flatten(1)

    def apply(self, params, state, inputs):
        s = self._vector(inputs.student_features[self.student_feature])
        t = self._vector(inputs.teacher_features[self.teacher_feature])
        log_variance = losses.variance_branch(s, params["variance"])
        if "connector" in params:
            s = s @ params["connector"]["weight"].T + params["connector"]["bias"]
        return losses.pad_l2(s, t, log_variance, self.eps), state
