"""Terms that compare one student feature with one teacher feature as per-example vectors (embeddings).

Relational and contrastive methods (SP, RKD, PKT, CC, CRD) look at a batch of vectors, one per example:
by default the vector each network's classifier head reads (the feature named ``embedding`` that every
fkd model returns: ``relu(fc1(...))`` for ``seed_cnn``, the pooled vector for ``small_cnn``, the input
of the last ``nn.Linear`` of a torchvision classifier). ``student_feature`` / ``teacher_feature`` name
another feature instead; a map ``(C, H, W)`` is flattened to ``C*H*W``, and a transformer's token
sequence ``(N, D)`` is read as its mean token ``(D,)`` (:func:`fkd.losses.pool_tokens`).

Unlike ``feature`` and ``attention``, which match ``distill.student_features[i]`` with
``distill.teacher_features[i]``, an embedding term carries its own pair, so it combines with a FitNets
hint on other layers in one objective.
"""

from __future__ import annotations

import attrs
import einops
from torch import Tensor

from fkd import losses
from fkd.errors import ConfigError
from fkd.terms.base import Shapes, Term, TermInputs, hyper

#: The feature every fkd model returns: the vector its classifier head reads, (B, D).
EMBEDDING = "embedding"


def _name(inst, attribute, value) -> None:
    if not (isinstance(value, str) and value.strip()):
        raise ValueError(f"must name a feature, e.g. '{EMBEDDING}' (got {value!r})")


@attrs.frozen
class EmbeddingTerm(Term):
    """Base class: a term on the pair ``(student_feature, teacher_feature)``, each read as ``(B, D)``."""

    consumes = frozenset({"student_features", "teacher_features"})
    student_feature: str = hyper(
        EMBEDDING, _name,
        help="student feature this term reads; 'embedding' (default) is the vector its classifier reads")
    teacher_feature: str = hyper(
        EMBEDDING, _name,
        help="teacher feature this term reads; 'embedding' (default) is the vector its classifier reads")

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """The one ``(student, teacher)`` feature pair; the objective asks both models for it."""
        return ((self.student_feature, self.teacher_feature),)

    def check(self, shapes: Shapes) -> None:
        s = shapes.student_features.get(self.student_feature)
        t = shapes.teacher_features.get(self.teacher_feature)
        for side, name, shape in (("student", self.student_feature, s), ("teacher", self.teacher_feature, t)):
            if shape is None:
                raise ConfigError(f"the {self.name} term reads the {side} feature '{name}', which the {side} does "
                                  f"not return; set distill.terms.{self.name}.{side}_feature to one it has.")

    def embeddings(self, inputs: TermInputs) -> tuple[Tensor, Tensor]:
        """``(student (B, D_s), teacher (B, D_t))``: the two features, flattened per example (tokens pooled)."""
        s = inputs.student_features[self.student_feature]
        t = inputs.teacher_features[self.teacher_feature]
        return _vector(s), _vector(t)


def _vector(x: Tensor) -> Tensor:
    """``(B, ...)`` -> ``(B, D)``: tokens ``(B, N, D)`` pooled to their mean, anything else flattened."""
    return losses.pool_tokens(x) if x.ndim == 3 else einops.rearrange(x, "b ... -> b (...)")


def embedding_size(shape: tuple) -> int:
    """D of the vector :meth:`EmbeddingTerm.embeddings` makes of a feature of ``shape`` (batch excluded)."""
    if len(shape) == 2:
        return int(shape[-1])
    size = 1
    for d in shape:
        size *= int(d)
    return size
