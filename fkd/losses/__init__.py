"""Distillation losses, as pure functions.

Every function here takes tensors and returns a 0-d tensor (``weighted_sum`` also returns a
metrics dict). None of them reads a tensor's value on the host, branches on one, keeps state or
writes into its inputs, so they compose with ``torch.func.grad``, ``torch.func.vmap`` and
``torch.compile``. The only Python ``if``s are on shapes, which are static.

Conventions
-----------
* The teacher is a constant: every teacher tensor is detached, so no gradient reaches it even if
  the caller forgets ``torch.no_grad``.
* Shapes are read from the end (classes on the last axis, ``(C, H, W)`` on the last three), and the
  reduction is a mean over everything in front. For the documented batched shapes that is the usual
  batch mean; under ``vmap`` over the batch the same function sees one sample and returns that
  sample's loss, so ``vmap(loss)(...).mean()`` equals ``loss(...)``.
* A shape mismatch between student and teacher raises ``ValueError`` naming both shapes.

Contents, top to bottom
-----------------------
logit distillation   ``soft_target_kl``, ``cross_entropy``, ``blended_kd``      (Hinton et al. 2015)
                     ``hard_label_kd``                                      (Touvron et al. 2021)
feature distillation ``feature_mse``, ``init_regressor``, ``fitnet_hint``, ``feature_kd``
                                                                           (Romero et al. 2015)
attention transfer   ``attention_map``, ``attention_transfer``       (Zagoruyko & Komodakis 2017)
combining terms      ``weighted_sum``

and, re-exported from their own modules (which import only torch and einops):

:mod:`fkd.losses.logits`     ``dkd`` (and ``dkd_per_example``), ``dist``, ``logit_standardized_kd``
:mod:`fkd.losses.relations`  ``similarity_preserving``, ``rkd``, ``pkt``, ``correlation_congruence``
:mod:`fkd.losses.maps`       ``nst``, ``vid_nll`` (with ``init_vid_params``, ``vid_regressor``,
                             ``pool_to_common_size``)
:mod:`fkd.losses.contrastive` ``crd`` (with its memory banks: ``init_memory``, ``momentum_update``)
:mod:`fkd.losses.tokens`     ``map_to_tokens``, ``pool_tokens``, ``token_pair`` (token features, ``(B, N, D)``)
:mod:`fkd.losses.groups`     ``ensemble_distribution``, ``confidence_weights``, ``ensemble_logits``,
                             ``mutual_learning`` (with ``mutual_learning_member``)
:mod:`fkd.losses.review`     ``hcl`` (ReviewKD)
:mod:`fkd.losses.flow`       ``fsp`` (with ``fsp_matrix``)
:mod:`fkd.losses.boundaries` ``ab``, ``ofd_margin``, ``ofd``
:mod:`fkd.losses.regression` ``srrl``
:mod:`fkd.losses.singular`   ``kdsvd`` (with ``singular_vectors``)
:mod:`fkd.losses.connectors` the learnable parts of those terms: ``init_conv_bn``/``conv_bn``, ``init_abf``/``abf``
:mod:`fkd.losses.streamlined` ``skd_instance``, ``skd_direction``                 (SKD, CVPR 2026)
:mod:`fkd.losses.multilevel`  ``mlkd`` (with ``median_share``)                   (Jin et al. 2023)
:mod:`fkd.losses.curriculum`  ``gradient_reversal``, ``ctkd_lambda``, ``ctkd_temperature`` (Li et al. 2023)
:mod:`fkd.losses.virtual_teacher` ``tf_kd_regularization``                        (Yuan et al. 2020)
:mod:`fkd.losses.uncertainty` ``pad_l2`` (with ``variance_branch``)              (Zhang et al. 2020)
:mod:`fkd.losses.channels`    ``ickd`` (with ``conv_bn_embed``)                  (Liu et al. 2021)
:mod:`fkd.losses.factors`     ``factor_transfer`` (with the paraphraser and translator) (Kim et al. 2018)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fkd.losses.contrastive import crd
from fkd.losses.groups import (confidence_weights, ensemble_distribution, ensemble_logits, mutual_learning,
                               mutual_learning_member)
from fkd.losses.logits import dist, dkd, dkd_per_example, logit_standardized_kd
from fkd.losses.maps import init_vid_params, nst, pool_to_common_size, vid_nll, vid_regressor
from fkd.losses.relations import correlation_congruence, pkt, rkd, similarity_preserving
from fkd.losses.boundaries import ab, ofd, ofd_margin  # noqa: I001 -- issue 20
from fkd.losses.connectors import abf, conv_bn, init_abf, init_conv_bn
from fkd.losses.flow import fsp, fsp_matrix
from fkd.losses.regression import srrl
from fkd.losses.review import hcl
from fkd.losses.singular import kdsvd, singular_vectors
from fkd.losses.channels import conv_bn_embed, ickd
from fkd.losses.curriculum import ctkd_lambda, ctkd_temperature, gradient_reversal
from fkd.losses.factors import (factor_transfer, init_paraphraser, init_translator, paraphraser_encode,
                                paraphraser_reconstruct, translate)
from fkd.losses.multilevel import median_share, mlkd
from fkd.losses.streamlined import skd_direction, skd_instance
from fkd.losses.uncertainty import pad_l2, variance_branch
from fkd.losses.virtual_teacher import tf_kd_regularization
from fkd.losses.tokens import map_to_tokens, pool_tokens, token_pair

__all__ = [
    "attention_map",
    "confidence_weights",
    "ensemble_distribution",
    "ensemble_logits",
    "mutual_learning",
    "mutual_learning_member",
    "attention_transfer",
    "blended_kd",
    "correlation_congruence",
    "crd",
    "cross_entropy",
    "dist",
    "dkd",
    "dkd_per_example",
    "feature_kd",
    "feature_mse",
    "fitnet_hint",
    "hard_label_kd",
    "init_regressor",
    "init_vid_params",
    "logit_standardized_kd",
    "map_to_tokens",
    "nst",
    "pkt",
    "pool_tokens",
    "pool_to_common_size",
    "rkd",
    "similarity_preserving",
    "soft_target_kl",
    "token_pair",
    "vid_nll",
    "vid_regressor",
    "weighted_sum",
    # issue 20
    "ab", "abf", "conv_bn", "fsp", "fsp_matrix", "hcl", "init_abf", "init_conv_bn", "kdsvd", "ofd", "ofd_margin",
    "singular_vectors", "srrl",
    # issue 20 (first half)
    "conv_bn_embed",
    "ctkd_lambda",
    "ctkd_temperature",
    "factor_transfer",
    "gradient_reversal",
    "ickd",
    "init_paraphraser",
    "init_translator",
    "median_share",
    "mlkd",
    "pad_l2",
    "paraphraser_encode",
    "paraphraser_reconstruct",
    "skd_direction",
    "skd_instance",
    "tf_kd_regularization",
    "translate",
    "variance_branch",
]

Scalar = float | Tensor  # a Python number or a 0-d tensor


# --------------------------------------------------------------------------------------------
# Logit distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network")
# --------------------------------------------------------------------------------------------


def soft_target_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: Scalar) -> Tensor:
    r"""Temperature-scaled KL divergence from the teacher's soft targets to the student's.

    .. math::

        L = T^2 \cdot \frac{1}{B} \sum_b \sum_c p_t^{(b,c)} \big(\log p_t^{(b,c)} - \log p_s^{(b,c)}\big),
        \qquad p_t = \mathrm{softmax}(z_t / T),\; p_s = \mathrm{softmax}(z_s / T)

    i.e. ``T**2 * KL(p_t || p_s)`` averaged over the batch; it equals
    ``F.kl_div(log_softmax(z_s/T), softmax(z_t/T), reduction="batchmean") * T**2``.

    Source: Hinton et al. 2015, Sec. 2 (the ``T**2`` factor) and Sec. 2.1, eq. 2 (the gradient).
    Per sample, the gradient of the un-scaled KL with respect to the student's logits is
    ``(p_s - p_t) / T``, and ``p_s - p_t`` itself shrinks like ``1/T`` at high temperature, so the
    soft term's gradients scale as ``1/T**2``; multiplying by ``T**2`` keeps its weight against
    the hard-label term comparable across temperatures. With it, ``dL/dz_s = T * (p_s - p_t) / B``.

    Both sides go through ``log_softmax``, so ``log p_t`` never has to be recovered from a
    probability that underflowed. Where ``p_t`` is exactly 0 (a teacher logit of ``-inf``, or one
    so small that ``exp`` underflows) the summand is taken as 0, the limit of ``p log p``.

    Args:
        student_logits: ``(B, C)`` raw scores; gradients flow into these.
        teacher_logits: ``(B, C)`` raw scores; detached.
        temperature: ``T > 0``, a float or a 0-d tensor.

    Returns:
        0-d tensor, nats (times ``T**2``), mean over the batch.
    """
    _check_same_shape("soft_target_kl", student_logits, "student_logits", teacher_logits, "teacher_logits")
    teacher_logits = teacher_logits.detach()
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    p_t = log_p_t.exp()
    # torch.where instead of multiplying through: with p_t == 0 and log_p_t == -inf the product
    # would be nan; the unselected branch also gets a zero gradient, so no nan leaks backwards.
    summand = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0)
    return temperature**2 * summand.sum(dim=-1).mean()


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    r"""Mean cross-entropy over the labeled examples, ``-(1/L) sum_{b: y_b >= 0} log softmax(z_b)[y_b]``.

    An example with label -1 is unlabeled (a transfer-set image, see :mod:`fkd.data.transfer`) and
    contributes nothing; ``L = max(#labeled, 1)``, so a batch without labels gives 0 with zero (finite)
    gradients. The mask is a multiplication, not an index, so shapes never depend on the data and the
    loss stays compilable and vmappable. With every example labeled it equals ``F.cross_entropy``.

    Args:
        logits: ``(B, C)`` raw scores (or ``(C,)`` for a single sample).
        labels: ``(B,)`` int64 class indices in ``[0, C)``, or -1 for unlabeled (or ``()``).

    Returns:
        0-d tensor, nats, mean over the labeled examples.
    """
    labeled = labels >= 0
    per_example = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    return (per_example * labeled).sum() / labeled.sum().clamp(min=1)


def hard_label_kd(student_logits: Tensor, teacher_logits: Tensor, label_smoothing: Scalar = 0.0) -> Tensor:
    r"""Hard-label distillation: cross-entropy with the teacher's decision as the label.

    .. math::

        L = \frac{1}{B} \sum_b -\log \mathrm{softmax}(z_s^{(b)})[y_t^{(b)}],
        \qquad y_t^{(b)} = \arg\max_c z_t^{(b,c)}

    Source: Touvron et al., "Training data-efficient image transformers & distillation through
    attention", ICML 2021, Sec. 4, eq. 3 ("hard-label distillation", ``L = 1/2 CE(psi(Z_s), y) +
    1/2 CE(psi(Z_s), y_t)``; this is the second half, the first is the ``ce`` term). DeiT feeds it the
    distillation token's head and the label term the class token's. ``label_smoothing`` eps turns
    ``y_t`` into ``1 - eps`` on the teacher's class and ``eps / C`` spread over all (the paper's note that
    hard labels "can also be converted into soft labels with label smoothing"), as
    ``F.cross_entropy(..., label_smoothing=eps)`` does. Every example counts, labeled or not (the
    teacher labels all of them). Ties in the teacher's logits go to the lowest index (``argmax``).

    Args:
        student_logits: ``(..., B, C)`` raw scores; gradients flow into these.
        teacher_logits: the same shape; detached, only its argmax is read.
        label_smoothing: eps in ``[0, 1]``, a float or 0-d tensor.

    Returns:
        0-d tensor, nats, mean over every leading axis.
    """
    _check_same_shape("hard_label_kd", student_logits, "student_logits", teacher_logits, "teacher_logits")
    classes = student_logits.shape[-1]
    targets = teacher_logits.detach().argmax(dim=-1).reshape(-1)
    log_p = F.log_softmax(student_logits.reshape(-1, classes), dim=-1)
    nll = -log_p.gather(-1, targets[:, None]).squeeze(-1)
    smooth = -log_p.mean(dim=-1)  # CE with the uniform distribution, the smoothing part
    return ((1 - label_smoothing) * nll + label_smoothing * smooth).mean()


def blended_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: Scalar = 2.0,
    alpha: Scalar = 0.7,
) -> Tensor:
    r"""Hinton et al.'s distillation objective: soft-target KL blended with hard-label CE.

    .. math::

        L = \alpha \cdot \mathrm{soft\_target\_kl}(z_s, z_t, T) + (1 - \alpha) \cdot \mathrm{CE}(z_s, y)

    ``alpha`` weighs the teacher term. Same value as the seed notebook's
    ``blended_distillation_loss(student_logits, teacher_logits, labels, T=2.0, alpha=0.7)``; the
    hard term uses the student's logits at temperature 1, as in Hinton et al. 2015, Sec. 2.

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)``; detached.
        labels: ``(B,)`` int64.
        temperature: ``T > 0`` for the soft term, a float or a 0-d tensor.
        alpha: weight of the soft term in ``[0, 1]``, a float or a 0-d tensor.

    Returns:
        0-d tensor. For the two terms as separate metrics use :func:`weighted_sum`.
    """
    soft = soft_target_kl(student_logits, teacher_logits, temperature)
    hard = cross_entropy(student_logits, labels)
    return alpha * soft + (1.0 - alpha) * hard


# --------------------------------------------------------------------------------------------
# Feature distillation (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets")
# --------------------------------------------------------------------------------------------


def feature_mse(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    r"""Mean squared error between a student and a teacher feature, ``mean((f_s - f_t)**2)``.

    The mean runs over every element (batch, channels and positions), as ``F.mse_loss`` does.
    This is the plain feature-matching term of the seed notebook's ``feature_distillation_loss``.

    Args:
        student_feat: any shape, e.g. ``(B, C, H, W)`` or ``(B, D)``.
        teacher_feat: exactly the same shape; detached.

    Returns:
        0-d tensor, in squared feature units.

    Raises:
        ValueError: if the shapes differ (no broadcasting; use :func:`fitnet_hint` to map a
            student feature onto a teacher's shape).
    """
    _check_same_shape("feature_mse", student_feat, "student_feat", teacher_feat, "teacher_feat")
    return F.mse_loss(student_feat, teacher_feat.detach())


def init_regressor(
    student_channels: int,
    teacher_channels: int,
    *,
    spatial: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    r"""Parameters of a FitNets regressor mapping student channels onto teacher channels.

    ``spatial=True``: a 1x1 convolution, ``{"weight": (Ct, Cs, 1, 1), "bias": (Ct,)}``.
    ``spatial=False``: a linear layer, ``{"weight": (Ct, Cs), "bias": (Ct,)}``.

    Initialised exactly as ``nn.Conv2d(Cs, Ct, 1)`` / ``nn.Linear(Cs, Ct)`` are by default:
    weight from Kaiming-uniform with ``a = sqrt(5)``, which is ``U(-1/sqrt(Cs), 1/sqrt(Cs))``, and
    bias from ``U(-1/sqrt(Cs), 1/sqrt(Cs))``. With a generator seeded like the global one, the
    values match those modules' bit for bit.

    The regressor belongs to the student side: put the returned dict into the trainable parameter
    pytree (fkd's ``feature`` term keeps it in ``state["params"]["objective"]``) and drop it
    after training, as Romero et al. 2015 do (Sec. 2.2).

    Returns:
        A dict of fresh tensors with ``requires_grad=False`` (parameters are detached leaves).
    """
    if student_channels < 1 or teacher_channels < 1:
        raise ValueError(
            f"init_regressor: channel counts must be positive, got student_channels={student_channels}, "
            f"teacher_channels={teacher_channels}"
        )
    shape = (teacher_channels, student_channels, 1, 1) if spatial else (teacher_channels, student_channels)
    # Filling fresh tensors in place is fine: nothing outside this function has seen them yet.
    weight = torch.empty(shape, dtype=dtype, device=device)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(student_channels)  # fan_in of a 1x1 conv or a linear layer
    bias = torch.empty(teacher_channels, dtype=dtype, device=device)
    torch.nn.init.uniform_(bias, -bound, bound, generator=generator)
    return {"weight": weight, "bias": bias}


def fitnet_hint(student_feat: Tensor, teacher_feat: Tensor, regressor: Mapping[str, Tensor]) -> Tensor:
    r"""FitNets hint loss: regress the student's feature onto the teacher's, then take the MSE.

    .. math::

        L = \mathrm{mean}\big((\mathrm{resize}(r(f_s)) - f_t)^2\big)

    Source: Romero et al. 2015, Sec. 2.2, eq. 3,
    ``L_HT = 1/2 || u_h(x) - r(v_g(x); W_r) ||^2``. Two deliberate differences:

    * reduction: a mean over all elements instead of ``1/2`` times the sum, so the term's scale
      does not grow with batch or feature size (the seed notebook uses ``F.mse_loss`` too);
    * geometry: FitNets picks the regressor's kernel size so that its output has the teacher's
      spatial size; here ``r`` is always a 1x1 convolution (``F.conv2d`` with
      ``regressor["weight"]``, ``regressor["bias"]``), followed by bilinear interpolation
      (``align_corners=False``) to the teacher's ``(Ht, Wt)`` when the sizes differ. Both steps are
      linear and bilinear weights sum to one, so the order of the two does not change the value.

    For vector features (``regressor["weight"]`` of shape ``(Ct, Cs)``, from
    ``init_regressor(..., spatial=False)``), ``r`` is the linear map ``f_s @ W.T + b``.

    Args:
        student_feat: ``(B, Cs, Hs, Ws)``, or ``(B, Cs)`` with a linear regressor.
        teacher_feat: ``(B, Ct, Ht, Wt)``, or ``(B, Ct)``; detached.
        regressor: ``{"weight", "bias"}`` as made by :func:`init_regressor`; trainable.

    Returns:
        0-d tensor, mean over batch, channels and positions.

    Raises:
        ValueError: if the student's channels do not match the regressor's input, or the
            regressed feature does not match the teacher's shape (spatial size aside).
    """
    weight, bias = regressor["weight"], regressor["bias"]
    if weight.ndim == 4:
        if tuple(weight.shape[-2:]) != (1, 1):
            raise ValueError(f"fitnet_hint: expected a 1x1 conv regressor, got weight of shape {tuple(weight.shape)}")
        if student_feat.ndim < 3 or teacher_feat.ndim < 3:
            raise ValueError(
                "fitnet_hint: a conv regressor needs (B, C, H, W) features, got student_feat of shape "
                f"{tuple(student_feat.shape)} and teacher_feat of shape {tuple(teacher_feat.shape)}"
            )
        channel_axis = -3
    elif weight.ndim == 2:
        if student_feat.ndim < 1:
            raise ValueError("fitnet_hint: student_feat must have a feature axis, got a 0-d tensor")
        channel_axis = -1
    else:
        raise ValueError(
            f"fitnet_hint: regressor weight must be (Ct, Cs, 1, 1) or (Ct, Cs), got {tuple(weight.shape)}"
        )
    if student_feat.shape[channel_axis] != weight.shape[1]:
        raise ValueError(
            f"fitnet_hint: student_feat of shape {tuple(student_feat.shape)} has "
            f"{student_feat.shape[channel_axis]} channels but the regressor (weight {tuple(weight.shape)}) "
            f"expects {weight.shape[1]}"
        )

    if weight.ndim == 4:
        regressed = _conv1x1(student_feat, weight, bias)
        regressed = _resize_bilinear(regressed, teacher_feat.shape[-2:])
    else:
        regressed = F.linear(student_feat, weight, bias)
    _check_same_shape("fitnet_hint", regressed, "regressed student_feat", teacher_feat, "teacher_feat")
    return F.mse_loss(regressed, teacher_feat.detach())


def feature_kd(
    student_logits: Tensor,
    labels: Tensor,
    student_feat: Tensor,
    teacher_feat: Tensor,
    regressor: Mapping[str, Tensor] | None = None,
    alpha: Scalar = 0.7,
    beta: Scalar = 0.3,
) -> Tensor:
    r"""Hard-label CE plus feature matching, the seed notebook's ``feature_distillation_loss``.

    .. math::

        L = \alpha \cdot \mathrm{CE}(z_s, y) + \beta \cdot D(f_s, f_t)

    with ``D = feature_mse`` when ``regressor`` is None (shapes must then match), else
    ``D = fitnet_hint`` with that regressor. Note that here ``alpha`` weighs the *hard* term,
    whereas in :func:`blended_kd` it weighs the teacher term; both follow the notebook.

    Args:
        student_logits: ``(B, C)``.
        labels: ``(B,)`` int64.
        student_feat: ``(B, Cs, Hs, Ws)`` or ``(B, Cs)``.
        teacher_feat: ``(B, Ct, Ht, Wt)`` or ``(B, Ct)``; detached.
        regressor: optional FitNets regressor from :func:`init_regressor`.
        alpha, beta: weights, floats or 0-d tensors.

    Returns:
        0-d tensor. For the two terms as separate metrics use :func:`weighted_sum`.
    """
    hard = cross_entropy(student_logits, labels)
    if regressor is None:
        feat = feature_mse(student_feat, teacher_feat)
    else:
        feat = fitnet_hint(student_feat, teacher_feat, regressor)
    return alpha * hard + beta * feat


# --------------------------------------------------------------------------------------------
# Attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention")
# --------------------------------------------------------------------------------------------


def attention_map(
    feat: Tensor, p: float = 2.0, eps: float = 1e-12, size: Sequence[int] | None = None
) -> Tensor:
    r"""Activation-based spatial attention map, flattened and L2-normalised per sample.

    .. math::

        Q = \frac{1}{C} \sum_{c} |f_c|^p \in \mathbb{R}^{H W}, \qquad
        \hat Q = Q / \max(\lVert Q \rVert_2, \epsilon)

    Source: Zagoruyko & Komodakis 2017, Sec. 3.1, the mapping ``F^p_sum(A) = sum_c |A_c|^p``; the
    reference code (github.com/szagoruyko/attention-transfer, ``at``) takes the channel *mean*
    instead of the sum, which the normalisation cancels (up to ``eps``). ``p = 2`` is the paper's
    default. For ``p < 1`` the gradient at an exactly-zero activation (common after ReLU) is not
    finite, so keep ``p >= 1`` for training.

    Args:
        feat: ``(B, C, H, W)`` (or ``(C, H, W)``); any channel count.
        p: exponent, > 0.
        eps: floor on the norm, as in ``F.normalize``; an all-zero map stays zero.
        size: optional ``(H', W')``: the channel-pooled map ``(B, 1, H, W)`` is resized to it by
            bilinear interpolation (``align_corners=False``) before flattening and normalising.

    Returns:
        ``(B, H*W)`` (or ``(H*W,)``; ``H'*W'`` with ``size``), each row of unit L2 norm.
    """
    if feat.ndim < 3:
        raise ValueError(f"attention_map: expected a (B, C, H, W) feature, got shape {tuple(feat.shape)}")
    q = feat.abs().pow(p).mean(dim=-3, keepdim=True)
    if size is not None:
        q = _resize_bilinear(q, size)
    return F.normalize(q.flatten(-3), p=2.0, dim=-1, eps=eps)


def attention_transfer(
    student_feats: Tensor | Sequence[Tensor],
    teacher_feats: Tensor | Sequence[Tensor],
    p: float = 2.0,
) -> Tensor:
    r"""Attention-transfer loss summed over matched pairs of student and teacher feature maps.

    .. math::

        L = \sum_j \frac{1}{B\, H_j W_j} \sum_{b} \big\lVert \hat Q_s^{j,b} - \hat Q_t^{j,b} \big\rVert_2^2

    with ``\hat Q`` from :func:`attention_map`: for each pair, the mean over batch *and* positions
    of the squared difference of the normalised maps.

    Source and the exact choice: the paper (Zagoruyko & Komodakis 2017, Sec. 3.1) writes
    ``L = L_CE + beta/2 * sum_j || Q_s^j/||Q_s^j||_2 - Q_t^j/||Q_t^j||_2 ||_p`` with ``p = 2``, a
    norm that is neither squared nor averaged. This function follows the authors' reference code
    instead, ``at_loss(x, y) = (at(x) - at(y)).pow(2).mean()`` (github.com/szagoruyko/
    attention-transfer, ``cifar.py``/``utils.py``), summed over pairs, because the published
    weight (``--beta 1e+3`` in that repository's README) was tuned for this scale. The ``beta``
    (or ``beta/2``) factor is not applied here: pass it as this term's weight in
    :func:`weighted_sum`.

    Differing resolutions: if a student map's ``(Hs, Ws)`` differs from the teacher's, the
    student's channel-pooled map ``(B, 1, Hs, Ws)`` is resized to ``(Ht, Wt)`` by bilinear
    interpolation (``align_corners=False``) *before* flattening and normalising. Resizing the
    one-channel map rather than the features is cheaper and needs no channel match. For an exact
    2x reduction this equals 2x2 average pooling; for larger reductions it samples rather than
    averages, so pair layers of similar resolution (the reference code only pairs equal sizes).

    Args:
        student_feats: a ``(B, Cs_j, Hs_j, Ws_j)`` tensor or a list/tuple of them.
        teacher_feats: a ``(B, Ct_j, Ht_j, Wt_j)`` tensor or a list/tuple of the same length,
            matched by position; detached. Channel counts may differ from the student's.
        p: exponent of the attention map.

    Returns:
        0-d tensor, the sum over pairs.

    Raises:
        ValueError: if the sequences differ in length or are empty, or a pair's batch shapes differ.
    """
    students = _as_feature_list("attention_transfer", student_feats, "student_feats")
    teachers = _as_feature_list("attention_transfer", teacher_feats, "teacher_feats")
    if len(students) != len(teachers):
        raise ValueError(
            f"attention_transfer: got {len(students)} student feature maps but {len(teachers)} teacher "
            "feature maps; they are paired by position"
        )
    if not students:
        raise ValueError("attention_transfer: needs at least one pair of feature maps")

    total: Tensor | None = None
    for j, (f_s, f_t) in enumerate(zip(students, teachers)):
        if f_s.ndim < 3 or f_t.ndim < 3 or f_s.shape[:-3] != f_t.shape[:-3]:
            raise ValueError(
                f"attention_transfer: pair {j}: student feature of shape {tuple(f_s.shape)} and teacher "
                f"feature of shape {tuple(f_t.shape)} must both be (B, C, H, W) with the same B"
            )
        q_s = attention_map(f_s, p, size=f_t.shape[-2:])
        q_t = attention_map(f_t.detach(), p)
        term = (q_s - q_t).pow(2).mean()
        total = term if total is None else total + term
    return total


# --------------------------------------------------------------------------------------------
# Combining terms
# --------------------------------------------------------------------------------------------


def weighted_sum(terms: Mapping[str, Tensor], weights: Mapping[str, Scalar]) -> tuple[Tensor, dict[str, Tensor]]:
    r"""Combine named loss terms, ``L = sum_k w_k * terms[k]``, and report each term.

    Example, the notebook's feature KD (``0.7 * CE + 0.3 * MSE``)::

        loss, metrics = weighted_sum(
            {"ce": cross_entropy(z_s, y), "feature": feature_mse(f_s, f_t)},
            {"ce": 0.7, "feature": 0.3},
        )

    Args:
        terms: name -> 0-d loss tensor.
        weights: name -> weight (float or 0-d tensor); exactly the same names as ``terms``.

    Returns:
        ``(loss, metrics)``: ``loss`` is differentiable; ``metrics`` holds every term, unweighted,
        and ``"loss"``, all detached, so it can be returned as ``aux`` from
        ``torch.func.grad_and_value(..., has_aux=True)`` and stays on the device.

    Raises:
        ValueError: if the names differ, ``terms`` is empty, or a term is called ``"loss"``.
    """
    if set(terms) != set(weights):
        missing = sorted(set(terms) - set(weights))
        unused = sorted(set(weights) - set(terms))
        raise ValueError(
            f"weighted_sum: terms and weights must have the same names; no weight for {missing}, "
            f"no term for {unused}"
        )
    if not terms:
        raise ValueError("weighted_sum: needs at least one term")
    if "loss" in terms:
        raise ValueError('weighted_sum: "loss" is reserved for the total; rename that term')

    loss: Tensor | None = None
    for name, value in terms.items():
        weighted = weights[name] * value
        loss = weighted if loss is None else loss + weighted
    metrics = {name: value.detach() for name, value in terms.items()}
    metrics["loss"] = loss.detach()
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Private helpers (static shape logic only)
# --------------------------------------------------------------------------------------------


def _check_same_shape(fn: str, a: Tensor, a_name: str, b: Tensor, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{fn}: {a_name} has shape {tuple(a.shape)} but {b_name} has shape {tuple(b.shape)}; "
            "they must match"
        )


def _as_feature_list(fn: str, feats: Tensor | Sequence[Tensor], name: str) -> list[Tensor]:
    if isinstance(feats, Tensor):
        return [feats]
    if isinstance(feats, (list, tuple)):
        return list(feats)
    raise TypeError(f"{fn}: {name} must be a tensor or a list/tuple of tensors, got {type(feats).__name__}")


def _conv1x1(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``F.conv2d`` on ``(..., C, H, W)``: leading axes are folded into one batch axis and back,
    so the same code serves ``(B, C, H, W)`` and a single ``(C, H, W)`` sample under vmap."""
    lead = x.shape[:-3]
    y = F.conv2d(x.reshape((-1,) + tuple(x.shape[-3:])), weight, bias)
    return y.reshape(tuple(lead) + tuple(y.shape[-3:]))


def _resize_bilinear(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of ``(..., C, H, W)`` to ``size = (H', W')``; the identity if sizes agree."""
    size = tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    lead = x.shape[:-3]
    y = F.interpolate(x.reshape((-1,) + tuple(x.shape[-3:])), size=size, mode="bilinear", align_corners=False)
    return y.reshape(tuple(lead) + tuple(y.shape[-3:]))
