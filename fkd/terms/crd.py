"""``crd``: contrastive representation distillation with per-example memory banks (Tian et al. 2020)."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from fkd import losses, prng
from fkd.errors import ConfigError
from fkd.losses import contrastive
from fkd.terms.base import Shapes, hyper, positive, register_term
from fkd.terms.embedding import EmbeddingTerm, embedding_size

#: Folded into the step's key so CRD's negatives are independent of other terms' random draws.
_STREAM = 0x637264  # "crd"


def _positive_int(inst, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be a whole number >= 1 (got {value!r})")


def _momentum(inst, attribute, value) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"must be in [0, 1) (got {value!r})")


@register_term("crd")
@attrs.frozen
class ContrastiveRepresentation(EmbeddingTerm):
    """:func:`fkd.losses.contrastive.crd` on the pair of embeddings (Tian, Krishnan & Isola, ICLR 2020).

    ``params = {"student_head": {"weight": (F, D_s), "bias": (F,)}, "teacher_head": {... (F, D_t) ...}}``:
    the two linear embedding heads (``nn.Linear`` init), trained with the student -- the teacher's
    head too, as in the authors' code; the teacher itself stays fixed.
    ``state = {"memory_student": (N, F), "memory_teacher": (N, F), "z_student": (), "z_teacher": ()}``:
    the memory banks over the ``N`` training examples (rows indexed by ``inputs.idx``) and the NCE
    normalisers, fixed at the first step (negative until then).

    Each step draws ``K = min(nce_k, N - 1)`` negatives per example uniformly over the ``N`` examples
    from the step's key. Memory: ``2 N F`` floats of state (CIFAR-100: 51 MB at F = 128); compute: two
    ``(B, F) @ (F, N)`` products per step.
    """

    summary = "CRD: NCE between student and teacher embeddings against per-example memory banks (Tian et al. 2020)"
    sweepable = frozenset({"temperature", "momentum"})
    consumes = frozenset({"student_features", "teacher_features", "idx", "key"})
    feat_dim: int = hyper(128, _positive_int, help="dimension F of the embedding heads and the memory banks")
    nce_k: int = hyper(16384, _positive_int,
                       help="negatives K per example (capped at the training-set size minus one)")
    temperature: float = hyper(0.07, positive, help="temperature T of the exp(<v, m> / T) scores")
    momentum: float = hyper(0.5, _momentum, help="memory update m[i] <- l2norm(m m[i] + (1 - m) v[i])")

    def check(self, shapes: Shapes) -> None:
        super().check(shapes)
        if shapes.num_examples < 2:
            raise ConfigError("the crd term keeps a memory bank per training example and needs at least 2 "
                              f"training examples (got {shapes.num_examples}).")

    def init(self, shapes: Shapes, generator: torch.Generator) -> tuple[dict, dict]:
        d_s = embedding_size(shapes.student_features[self.student_feature])
        d_t = embedding_size(shapes.teacher_features[self.teacher_feature])
        params = {
            "student_head": losses.init_regressor(d_s, self.feat_dim, spatial=False, generator=generator),
            "teacher_head": losses.init_regressor(d_t, self.feat_dim, spatial=False, generator=generator),
        }
        n = shapes.num_examples
        state = {
            "memory_student": contrastive.init_memory(n, self.feat_dim, generator=generator),
            "memory_teacher": contrastive.init_memory(n, self.feat_dim, generator=generator),
            "z_student": torch.full((), -1.0),
            "z_teacher": torch.full((), -1.0),
        }
        return params, state

    def apply(self, params, state, inputs):
        s, t = self.embeddings(inputs)
        v_s = F.normalize(F.linear(s, params["student_head"]["weight"], params["student_head"]["bias"]), dim=1)
        v_t = F.normalize(F.linear(t, params["teacher_head"]["weight"], params["teacher_head"]["bias"]), dim=1)
        idx = inputs.idx
        n = state["memory_student"].shape[0]
        k = min(self.nce_k, n - 1)
        negatives = prng.randint(prng.fold_in(inputs.key, _STREAM), (idx.shape[0], k), n)
        contrast_idx = torch.cat([idx[:, None], negatives], dim=1)
        loss, z_s, z_t = contrastive.crd(v_s, v_t, state["memory_student"], state["memory_teacher"], contrast_idx,
                                         state["z_student"], state["z_teacher"], self.hp(inputs, "temperature"))
        m = self.hp(inputs, "momentum")
        new_state = {
            "memory_student": contrastive.momentum_update(state["memory_student"], idx, v_s, m),
            "memory_teacher": contrastive.momentum_update(state["memory_teacher"], idx, v_t, m),
            "z_student": z_s,
            "z_teacher": z_t,
        }
        return loss, new_state
