"""The distillation objective: a weighted sum of named loss terms over student and teacher outputs.

Terms (all from :mod:`fkd.losses`):

* ``ce``        -- cross-entropy with the labels;
* ``logit``     -- ``soft_target_kl`` at temperature T (Hinton et al. 2015);
* ``feature``   -- FitNets hint per (student, teacher) feature pair, averaged over pairs (Romero et al. 2015);
* ``attention`` -- attention transfer over the feature pairs (Zagoruyko & Komodakis 2017).

``loss = sum_k w_k * term_k``. Weights are plain Python floats fixed when the objective is built, so
a zero-weight term is never computed and nothing branches on tensor values.
"""

from __future__ import annotations

import attrs
import torch

from fkd import losses
from fkd.errors import ConfigError

Regressors = dict[str, dict[str, torch.Tensor]]


def pair_key(student_name: str, teacher_name: str) -> str:
    """The regressor key of a feature pair, e.g. ``"block2->layer1"``."""
    return f"{student_name}->{teacher_name}"


@attrs.frozen
class Objective:
    """``objective(...) -> (loss, metrics)``; see the module docstring.

    Attributes:
        weights: ``{term: weight}`` over ``ce``, ``logit``, ``feature``, ``attention``.
        temperature: T of the ``logit`` term.
        pairs: ``((student_feature, teacher_feature), ...)`` matched by the feature terms.
        attention_p: the power p of attention maps.
    """

    weights: dict
    temperature: float = 2.0
    pairs: tuple = ()
    attention_p: float = 2.0

    @property
    def needs_teacher(self) -> bool:
        return any(term != "ce" and w != 0 for term, w in self.weights.items())

    @property
    def needs_features(self) -> bool:
        return any(term in ("feature", "attention") and w != 0 for term, w in self.weights.items())

    @property
    def needs_regressors(self) -> bool:
        return self.weights.get("feature", 0) != 0

    def init_regressors(
        self, student_shapes: dict, teacher_shapes: dict, *, seed: int = 0, device="cpu"
    ) -> Regressors:
        """One FitNets regressor per pair, mapping student channels to teacher channels.

        ``*_shapes`` map feature names to shapes without the batch dim: ``(C, H, W)`` or ``(C,)``.
        Pairs that cannot be matched (one spatial, the other not) raise :class:`ConfigError`.
        """
        check_pairs(self, student_shapes, teacher_shapes)
        if not self.needs_regressors:
            return {}
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for s, t in self.pairs:
            s_shape, t_shape = student_shapes[s], teacher_shapes[t]
            reg = losses.init_regressor(s_shape[0], t_shape[0], generator=gen, spatial=len(s_shape) == 3)
            out[pair_key(s, t)] = {k: v.to(device) for k, v in reg.items()}
        return out

    def __call__(
        self,
        student_logits: torch.Tensor,
        student_features: dict,
        labels: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        teacher_features: dict | None = None,
        regressors: Regressors | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted loss and per-term metrics (detached 0-d tensors, never synced to the host)."""
        terms: dict[str, torch.Tensor] = {}
        w = {k: v for k, v in self.weights.items() if v != 0}
        if "ce" in w:
            terms["ce"] = losses.cross_entropy(student_logits, labels)
        if "logit" in w:
            terms["logit"] = losses.soft_target_kl(student_logits, teacher_logits, self.temperature)
        if "feature" in w:
            hints = [
                losses.fitnet_hint(student_features[s], teacher_features[t], regressors[pair_key(s, t)])
                for s, t in self.pairs
            ]
            terms["feature"] = torch.stack(hints).mean()
        if "attention" in w:
            terms["attention"] = losses.attention_transfer(
                [student_features[s] for s, _ in self.pairs],
                [teacher_features[t] for _, t in self.pairs],
                p=self.attention_p,
            )
        return losses.weighted_sum(terms, w)


def check_pairs(objective: Objective, student_shapes: dict, teacher_shapes: dict) -> None:
    """Raise :class:`ConfigError` when a feature pair cannot be matched, saying why."""
    if not objective.needs_features:
        return
    for s, t in objective.pairs:
        s_shape, t_shape = tuple(student_shapes[s]), tuple(teacher_shapes[t])
        if len(s_shape) not in (1, 3) or len(t_shape) not in (1, 3):
            raise ConfigError(
                f"cannot match student feature '{s}' {s_shape} with teacher feature '{t}' {t_shape}: "
                "features must be (C,) vectors or (C, H, W) maps."
            )
        if len(s_shape) != len(t_shape):
            raise ConfigError(
                f"cannot match student feature '{s}' of shape {s_shape} with teacher feature '{t}' of shape "
                f"{t_shape}: one is a spatial map, the other a vector; pick features of the same kind."
            )
        if objective.weights.get("attention", 0) and len(s_shape) != 3:
            raise ConfigError(
                f"attention transfer needs spatial maps, but '{s}' and '{t}' are vectors; pick conv features."
            )


def from_config(distill) -> Objective:
    """Build the objective a :class:`fkd.config.DistillConfig` describes."""
    weights = distill.term_weights()
    if len(distill.student_features) != len(distill.teacher_features):
        raise ConfigError("distill.student_features and distill.teacher_features are paired by position; "
                          "give them the same number of names.")
    pairs = tuple(zip(distill.student_features, distill.teacher_features))
    if any(term in ("feature", "attention") and w for term, w in weights.items()) and not pairs:
        raise ConfigError("feature and attention terms need distill.student_features and distill.teacher_features.")
    return Objective(weights=weights, temperature=distill.temperature, pairs=pairs, attention_p=distill.attention_p)
