"""Function matching's image mixing: mixup and cutmix, drawn from the step's key, batched on the device.

Beyer et al. (CVPR 2022), "Knowledge distillation: A good teacher is patient and consistent", distil by
*function matching*: the student matches the teacher on aggressively mixed images -- images no data set
holds -- so it learns the teacher's function between the training images, not only at them. Both
models must see the **same** mixed image (a "consistent" teacher), so the mixing happens inside the
step (:func:`fkd.step.make_train_step`'s ``mix``), before the teacher and the student run; the teacher
therefore runs live (a cache cannot hold every mix).

A mixer is ``mix(x, key) -> x``: ``x`` float32 (B, C, H, W), ``key`` a :mod:`fkd.prng` key (the step
folds its own key with :data:`fkd.step.MIX_STREAM`). Every random number -- the ratio, the partner
order, the box -- comes from ``key``, so a step's mix is reproducible, differs from step to step, is
the same eagerly, compiled and resumed, and a vmapped sweep gives each student its own. Shapes never
depend on the data.

* **mixup** (Zhang et al. 2018): ``lam x + (1 - lam) x[perm]`` with one ``lam ~ Beta(alpha, alpha)``
  per batch and ``perm`` a random permutation of the batch (big_vision's distillation mixes with one
  ratio per batch too).
* **cutmix** (Yun et al. 2019): one box of area ``(1 - lam) H W`` (``lam ~ Beta(alpha, alpha)``),
  centred uniformly at random and clipped to the image, is pasted from ``x[perm]``.
* both: each step picks one of the two with probability 1/2.

There are no labels to mix: function matching distils from the teacher alone, and configuring a
label-based term with mixing is refused (:func:`check_mixing`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from fkd import prng
from fkd.errors import ConfigError


def partner_order(key: Tensor, batch: int, device) -> Tensor:
    """A random permutation of ``range(batch)`` from ``key``: the argsort of ``batch`` uniforms, (B,) int64."""
    return torch.argsort(prng.uniform(key, (batch,)).to(device))


def mixup(x: Tensor, key: Tensor, alpha: float) -> Tensor:
    """``lam x + (1 - lam) x[perm]``, ``lam ~ Beta(alpha, alpha)`` once per batch; (B, ...) -> (B, ...)."""
    lam = prng.beta(prng.fold_in(key, 0), alpha).to(x.device, x.dtype)
    partner = x.index_select(0, partner_order(prng.fold_in(key, 1), x.shape[0], x.device))
    return lam * x + (1.0 - lam) * partner


def cutmix(x: Tensor, key: Tensor, alpha: float) -> Tensor:
    """``x`` with one box per batch replaced by the same box of ``x[perm]``; (B, C, H, W) -> (B, C, H, W).

    The box has sides ``sqrt(1 - lam) * (H, W)`` (``lam ~ Beta(alpha, alpha)``), its centre uniform over
    the image, clipped at the borders (Yun et al. 2019, Sec. 3.1).
    """
    height, width = x.shape[-2:]
    lam = prng.beta(prng.fold_in(key, 0), alpha)
    cut = torch.sqrt(1.0 - lam)
    centre = prng.uniform(prng.fold_in(key, 2), (2,))
    cy, cx = centre[0] * height, centre[1] * width
    half_h, half_w = cut * height / 2, cut * width / 2
    rows = torch.arange(height, dtype=torch.float32) + 0.5  # pixel centres
    cols = torch.arange(width, dtype=torch.float32) + 0.5
    inside = (((rows - cy).abs() < half_h)[:, None] & ((cols - cx).abs() < half_w)[None, :]).to(x.device)
    partner = x.index_select(0, partner_order(prng.fold_in(key, 1), x.shape[0], x.device))
    return torch.where(inside, partner, x)


def make_mixer(mixup_alpha: float, cutmix_alpha: float) -> Callable[[Tensor, Tensor], Tensor] | None:
    """The step's ``mix(x, key)`` for ``data.mixup`` / ``data.cutmix`` (alphas, 0: off); None when both are off."""
    if mixup_alpha > 0 and cutmix_alpha > 0:
        def mix(x: Tensor, key: Tensor) -> Tensor:
            use_mixup = (prng.uniform(prng.fold_in(key, 3), ()) < 0.5).to(x.device)
            return torch.where(use_mixup, mixup(x, key, mixup_alpha), cutmix(x, key, cutmix_alpha))
        return mix
    if mixup_alpha > 0:
        return lambda x, key: mixup(x, key, mixup_alpha)
    if cutmix_alpha > 0:
        return lambda x, key: cutmix(x, key, cutmix_alpha)
    return None


def describe(mixup_alpha: float, cutmix_alpha: float) -> str:
    """One line for the run's start: which mixing is on and that the teacher runs live on it."""
    parts = [f"{name} alpha {alpha:g}" for name, alpha in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha))
             if alpha > 0]
    return (f"function matching: {' or '.join(parts)}, the same mixed images for student and teacher; "
            "the teacher runs live on the mixed view (no cache)")


def check_mixing(data_cfg, objective) -> None:
    """Refuse mixing without a teacher term, or with a term that reads the labels (they describe the
    unmixed images): function matching distils from the teacher alone."""
    if not data_cfg.mixes:
        return
    key = "data.mixup" if data_cfg.mixup > 0 else "data.cutmix"
    if not objective.needs_teacher:
        raise ConfigError(f"{key} mixes images for function matching, which needs a teacher term; add one "
                          f"(e.g. distill.method = 'terms' with [distill.terms.logit]) or set {key} = 0.")
    label_terms = [t.name for t in objective.terms if "labels" in t.term.consumes]
    if label_terms:
        raise ConfigError(f"{key} mixes images, but the '{label_terms[0]}' term reads labels, which describe the "
                          "unmixed images; function matching distils from the teacher alone: drop that term "
                          f"(distill.method = 'terms' with teacher terms only) or set {key} = 0.")
