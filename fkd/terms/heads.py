"""Terms that read the student's logits from a head of its choice: ``student_head``.

A model has one classifier in almost every case, and ``student_logits`` are its output. A distilled
DeiT (``timm:deit_*_distilled_*``, Touvron et al. 2021) has two: the class token's head, which is the
model's logits in training (the ``ce`` term reads it), and the distillation token's head, which the
teacher terms should read instead. fkd returns that second head as a feature, ``head_dist`` (an FX node
like any other, see :mod:`fkd.models.timm_models`); ``student_head = "head_dist"`` on ``hard_kd`` or
``logit`` makes the term read it (and asks the student for it). Evaluation and export use the model's
eval-mode output, the average of both heads, as the paper does.
"""

from __future__ import annotations

from torch import Tensor

from fkd.errors import ConfigError
from fkd.terms.base import Shapes, Term, TermInputs, hyper


def _head_name(inst, attribute, value) -> None:
    if not isinstance(value, str):
        raise ValueError(f"must be a feature name such as 'head_dist', or '' for the logits (got {value!r})")


def student_head_field():
    """The ``student_head`` field of a :class:`StudentHeadTerm` (declared last, after the term's own keys)."""
    return hyper("", _head_name,
                 help="student output read as its logits: '' the model's logits; a feature holding logits, e.g. "
                      "'head_dist', the distillation token's head of a distilled DeiT (timm:deit_*_distilled_*)")


class StudentHeadTerm(Term):
    """Base class: a term on ``(B, K)`` student logits, the model's (``student_head = ""``) or a feature's.

    A subclass (an ``@attrs.frozen`` class) declares ``student_head: str = student_head_field()``.
    """

    student_head: str

    @property
    def student_outputs(self) -> tuple[str, ...]:
        """Student features this term reads beyond any feature pair (the objective asks the student for them)."""
        return (self.student_head,) if self.student_head else ()

    def check(self, shapes: Shapes) -> None:
        if not self.student_head:
            return
        shape = shapes.student_features.get(self.student_head)
        if shape is None or tuple(shape) != (shapes.num_classes,):
            got = "which the student does not return" if shape is None else f"of shape {tuple(shape)}"
            raise ConfigError(
                f"distill.terms.{self.name}.student_head = '{self.student_head}' must name a student output of "
                f"{shapes.num_classes} logits, {got}; use 'head_dist' with a distilled DeiT student "
                "(timm:deit_*_distilled_*) or '' for the model's logits.")

    def head_logits(self, inputs: TermInputs) -> Tensor:
        """``(B, K)``: the student logits this term reads."""
        return inputs.student_features[self.student_head] if self.student_head else inputs.student_logits
