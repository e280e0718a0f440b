"""``vid``: variational information distillation, a learned Gaussian per feature pair (Ahn et al., CVPR 2019)."""

from __future__ import annotations

import attrs
import torch

from fkd import losses
from fkd.errors import ConfigError
from fkd.terms.base import Shapes, Term, check_pair_kinds, hyper, internal, pair_key, positive, register_term


@register_term("vid")
@attrs.frozen
class VariationalInformation(Term):
    """:func:`fkd.losses.vid_nll` summed over the feature pairs, as RepDistiller sums its ``VIDLoss`` modules.

    ``params = {"block2->layer1": {"w1", "w2", "w3", "log_scale"}, ...}``: per pair, RepDistiller's
    regressor (three bias-free 1x1 convolutions ``C_s -> C_t -> C_t -> C_t`` with ReLUs; linear maps for
    vector features) and one log-scale per teacher channel (:func:`fkd.losses.init_vid_params`),
    trained with the student. The larger map of a pair is average-pooled to the smaller's size first.
    """

    summary = ("variational information distillation: Gaussian NLL of each teacher feature given a learned regressor "
               "on its student feature, pairs from distill.student_features / teacher_features (Ahn et al. 2019)")
    consumes = frozenset({"student_features", "teacher_features"})
    init_variance: float = hyper(5.0, positive,
                                 help="initial variance softplus(log_scale) + eps of every teacher channel")
    eps: float = hyper(1e-5, positive, help="floor added to the variance")
    pairs: tuple = internal()

    def check(self, shapes: Shapes) -> None:
        if not self.init_variance > self.eps:
            raise ConfigError(f"distill.terms.vid.init_variance ({self.init_variance}) must exceed "
                              f"distill.terms.vid.eps ({self.eps}); raise init_variance.")
        check_pair_kinds("vid", self.pairs, shapes)

    def init(self, shapes: Shapes, generator: torch.Generator) -> tuple[dict, dict]:
        params = {}
        for s, t in self.pairs:
            params[pair_key(s, t)] = losses.init_vid_params(
                shapes.student_features[s][0], shapes.teacher_features[t][0], generator=generator,
                init_variance=self.init_variance, eps=self.eps)
        return params, {}

    def apply(self, params, state, inputs):
        per_pair = []
        for s, t in self.pairs:
            p = params[pair_key(s, t)]
            f_s, f_t = losses.pool_to_common_size(inputs.student_features[s], inputs.teacher_features[t])
            per_pair.append(losses.vid_nll(losses.vid_regressor(f_s, p), f_t, p["log_scale"], eps=self.eps))
        return torch.stack(per_pair).sum(), state
