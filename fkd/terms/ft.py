"""``ft``: factor transfer, a translated student factor matches the teacher's paraphrased one (Kim et al. 2018)."""

from __future__ import annotations

import attrs
import torch

from fkd import losses
from fkd.errors import ConfigError
from fkd.terms.base import (PretrainSettings, Shapes, Term, TermInputs, check_pair_kinds, hyper, internal,
                            non_negative, pair_key, positive, register_term)


def _rate(inst, attribute, value) -> None:
    if not 0.0 < value <= 4.0:
        raise ValueError(f"must be in (0, 4] (got {value!r})")


def _epochs(inst, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be a whole number >= 0 (got {value!r})")


@register_term("ft")
@attrs.frozen
class FactorTransfer(Term):
    """:func:`fkd.losses.factor_transfer` of ``translate(f_s)`` and ``paraphrase(f_t)``, summed over the pairs.

    Per pair ``(s, t)``: ``params[pair] = translator`` (three 3x3 convolutions ``C_s -> C_s -> F -> F``,
    trained with the student) and ``state[pair]`` holds the paraphraser (encoder ``C_t -> C_t -> F -> F``
    and decoder back), ``F = round(C_t * rate)``. The paraphraser is fitted in a **pre-phase** of the run
    (:mod:`fkd.pretrain`): ``pretrain_epochs`` passes on the teacher's features alone, L1 reconstruction
    (the authors' ``train_Paraphraser.py``: SGD lr 0.1, momentum 0.9, weight decay 5e-4; its ``--epoch 5``
    loop runs epochs 0..5, six passes), then it stays fixed: it lives in the term's state, which the
    student's optimizer does not see. The authors' CIFAR weights: CE 1 + ``beta`` 500 (this term's weight),
    rate 0.5, on the last block's map (their ``outputs[2]``).
    """

    summary = ("factor transfer: L1 between normalised factors, a paraphraser fitted on the teacher first, a "
               "translator on the student (Kim et al. 2018)")
    consumes = frozenset({"student_features", "teacher_features"})
    pretrain_part = "paraphraser"
    rate: float = hyper(0.5, _rate, help="paraphrase rate k: the factor has round(k * teacher channels) channels")
    pretrain_epochs: int = hyper(6, _epochs, help="epochs of the pre-phase that fits the paraphraser on the "
                                                  "teacher's features (0: keep it random)")
    pretrain_learning_rate: float = hyper(0.1, positive, help="SGD learning rate of the paraphraser's pre-phase")
    pretrain_weight_decay: float = hyper(5e-4, non_negative, help="SGD weight decay of the paraphraser's pre-phase")
    pairs: tuple = internal()

    def check(self, shapes: Shapes) -> None:
        check_pair_kinds("ft", self.pairs, shapes, spatial_only=True)
        for s, t in self.pairs:
            s_hw, t_hw = tuple(shapes.student_features[s][1:]), tuple(shapes.teacher_features[t][1:])
            if s_hw != t_hw:
                raise ConfigError(f"ft matches student feature '{s}' {s_hw} with teacher feature '{t}' {t_hw}: the "
                                  "translator and paraphraser keep the spatial size, so pick maps of equal size.")

    def _factor_channels(self, shapes: Shapes, t: str) -> int:
        return max(1, int(round(shapes.teacher_features[t][0] * self.rate)))

    def init(self, shapes: Shapes, generator: torch.Generator) -> tuple[dict, dict]:
        params, state = {}, {"paraphraser": {}}
        for s, t in self.pairs:
            f = self._factor_channels(shapes, t)
            state["paraphraser"][pair_key(s, t)] = losses.init_paraphraser(shapes.teacher_features[t][0], f, generator)
            params[pair_key(s, t)] = losses.init_translator(shapes.student_features[s][0], f, generator)
        return params, state

    def pretrain_settings(self) -> PretrainSettings:
        return PretrainSettings(self.pretrain_epochs, self.pretrain_learning_rate, 0.9, self.pretrain_weight_decay)

    def pretrain_loss(self, part: dict, inputs: TermInputs) -> torch.Tensor:
        """The authors' ``L1Loss()(paraphraser(f_t, mode=0), f_t)``, summed over the pairs."""
        per_pair = [(losses.paraphraser_reconstruct(f, part[pair_key(s, t)]) - f).abs().mean()
                    for s, t in self.pairs for f in (inputs.teacher_features[t],)]
        return torch.stack(per_pair).sum()

    def apply(self, params, state, inputs):
        per_pair = []
        for s, t in self.pairs:
            key = pair_key(s, t)
            factor_t = losses.paraphraser_encode(inputs.teacher_features[t], state["paraphraser"][key])
            factor_s = losses.translate(inputs.student_features[s], params[key])
            per_pair.append(losses.factor_transfer(factor_s, factor_t))
        return torch.stack(per_pair).sum(), state
