"""``ctkd``: curriculum temperature KD, a learnable temperature under gradient reversal (Li et al., AAAI 2023)."""

from __future__ import annotations

import attrs
import torch

from fkd import losses
from fkd.errors import ConfigError
from fkd.terms.base import Shapes, Term, hyper, non_negative, positive, register_term


@register_term("ctkd")
@attrs.frozen
class CurriculumTemperatureKD(Term):
    """:func:`fkd.losses.soft_target_kl` at ``T = ctkd_temperature(raw, lam(epoch))`` (the authors' global T).

    ``params = {"raw_temperature": 0-d}`` (the authors' ``Global_T``, initialised to 1) trains with the student,
    its gradient reversed and scaled by ``lam`` (:func:`fkd.losses.gradient_reversal`), so it *raises* the KD
    loss the student lowers. ``lam`` follows :func:`fkd.losses.ctkd_lambda` of ``floor(epoch) + 1``: the
    authors count epochs from 1 and change it once per epoch. ``state = {"temperature": 0-d}`` holds the last
    step's T (checkpointed, for inspection). The authors' CIFAR-100 script: ``-r 0.1 -a 0.9`` (CE 0.1, this
    term 0.9), ``--t_start 1 --t_end 20 --decay_max 0 --decay_min -1 --decay_loops 10``.
    """

    summary = "curriculum temperature KD: soft-target KL at a learned, adversarial temperature (Li et al. 2023)"
    consumes = frozenset({"student_logits", "teacher_logits", "epoch"})
    t_start: float = hyper(1.0, positive, help="lowest temperature: T = t_start + t_range * sigmoid(raw)")
    t_range: float = hyper(20.0, positive, help="temperature range above t_start (the authors' --t_end)")
    num_loops: float = hyper(10.0, positive, help="epochs of the cosine curriculum of the reversal strength lambda")
    lam_max: float = hyper(1.0, non_negative, help="lambda at the end of the curriculum")
    lam_min: float = hyper(0.0, non_negative, help="lambda at its start")
    init_raw: float = hyper(1.0, help="initial value of the learnable raw temperature (T = 1 + 20 sigmoid(1) = 15.6)")

    def check(self, shapes: Shapes) -> None:
        if self.lam_min > self.lam_max:
            raise ConfigError(f"distill.terms.ctkd.lam_min ({self.lam_min}) exceeds lam_max ({self.lam_max}); "
                              "swap them.")

    def init(self, shapes: Shapes, generator: torch.Generator) -> tuple[dict, dict]:
        raw = torch.tensor(float(self.init_raw))
        return {"raw_temperature": raw}, {"temperature": losses.ctkd_temperature(raw, 0.0, self.t_start, self.t_range)}

    def apply(self, params, state, inputs):
        lam = losses.ctkd_lambda(torch.floor(inputs.epoch) + 1, self.num_loops, self.lam_max, self.lam_min)
        temperature = losses.ctkd_temperature(params["raw_temperature"], lam, self.t_start, self.t_range)
        loss = losses.soft_target_kl(inputs.student_logits, inputs.teacher_logits, temperature)
        return loss, {"temperature": temperature.detach()}
