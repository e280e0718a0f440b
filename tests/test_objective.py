"""Tests for fkd.objective: the loss weights of each distillation method, the objective's value against
the hand-computed weighted sum of fkd.losses terms, and the FitNets regressors and pair checks."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from fkd import losses
from fkd.config import DistillConfig
from fkd.errors import ConfigError
from fkd.objective import Objective, check_pairs, from_config, pair_key

B, K = 4, 10
STUDENT_SHAPES = {"block1": (4, 8, 8), "block2": (8, 4, 4), "pool": (8,)}
TEACHER_SHAPES = {"layer1": (16, 8, 8), "layer2": (32, 2, 2), "avgpool": (32,)}
FEATURE_CFG = {"student_features": ["block1", "block2"], "teacher_features": ["layer1", "layer2"]}


def tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(B, K, generator=g)
    t_logits = 2 * torch.randn(B, K, generator=g)
    y = torch.randint(0, K, (B,), generator=g)
    s_feats = {k: torch.randn(B, *v, generator=g) for k, v in STUDENT_SHAPES.items()}
    t_feats = {k: torch.randn(B, *v, generator=g) for k, v in TEACHER_SHAPES.items()}
    return s_logits, s_feats, y, t_logits, t_feats


# --- term weights of each method ------------------------------------------------------------------


def test_term_weights_of_each_method():
    def weights(method, **kw):
        return DistillConfig(method=method, **kw).term_weights()

    assert weights("none") == {"ce": 1.0}
    w = weights("logit", alpha=0.7)
    assert w.keys() == {"ce", "logit"}
    assert w["ce"] == pytest.approx(0.3) and w["logit"] == pytest.approx(0.7)
    assert weights("feature") == {"ce": 0.7, "feature": 0.3}  # the notebook's 0.7 CE + 0.3 MSE
    assert weights("feature", alpha=0.5, beta=2.0) == {"ce": 0.5, "feature": 2.0}
    # Zagoruyko & Komodakis: CE plus beta * AT; alpha is not used.
    assert weights("attention", beta=250.0) == {"ce": 1.0, "attention": 250.0}
    assert weights("attention", alpha=0.1, beta=250.0) == weights("attention", alpha=0.9, beta=250.0)
    combined = weights("combined", weights={"ce": 1, "logit": 0.5, "feature": 0.25, "attention": 100})
    assert combined == {"ce": 1.0, "logit": 0.5, "feature": 0.25, "attention": 100.0}
    assert all(type(v) is float for v in combined.values())


def test_from_config_carries_weights_temperature_pairs_and_p():
    cfg = DistillConfig(method="attention", beta=3.0, temperature=4.0, attention_p=1.5, **FEATURE_CFG)
    obj = from_config(cfg)
    assert obj.weights == {"ce": 1.0, "attention": 3.0}
    assert obj.temperature == 4.0 and obj.attention_p == 1.5
    assert obj.pairs == (("block1", "layer1"), ("block2", "layer2"))
    assert obj.needs_teacher and obj.needs_features and not obj.needs_regressors
    base = from_config(DistillConfig(method="none"))
    assert not base.needs_teacher and not base.needs_features and not base.needs_regressors
    logit = from_config(DistillConfig(method="logit"))
    assert logit.needs_teacher and not logit.needs_features


def test_from_config_needs_feature_pairs_for_feature_terms():
    with pytest.raises(ConfigError, match="student_features"):
        from_config(DistillConfig(method="feature"))
    with pytest.raises(ConfigError, match="student_features"):
        from_config(DistillConfig(method="combined", weights={"ce": 1.0, "attention": 1.0}))
    # A feature term with weight zero needs no pairs.
    assert from_config(DistillConfig(method="combined", weights={"ce": 1.0, "feature": 0.0})).pairs == ()


# --- the objective's value ------------------------------------------------------------------------


def expected_terms(obj: Objective, regressors, s_logits, s_feats, y, t_logits, t_feats) -> dict:
    """Each term computed directly with fkd.losses, independently of Objective."""
    terms = {
        "ce": losses.cross_entropy(s_logits, y),
        "logit": losses.soft_target_kl(s_logits, t_logits, obj.temperature),
    }
    if regressors:
        hints = [losses.fitnet_hint(s_feats[s], t_feats[t], regressors[f"{s}->{t}"]) for s, t in obj.pairs]
        terms["feature"] = sum(hints) / len(hints)
    if obj.pairs:
        terms["attention"] = sum(
            losses.attention_transfer(s_feats[s], t_feats[t], p=obj.attention_p) for s, t in obj.pairs
        )
    return terms


METHOD_CONFIGS = {
    "none": DistillConfig(method="none"),
    "logit": DistillConfig(method="logit", alpha=0.6, temperature=3.0),
    "feature": DistillConfig(method="feature", **FEATURE_CFG),
    "attention": DistillConfig(method="attention", beta=50.0, attention_p=2.0, **FEATURE_CFG),
    "combined": DistillConfig(
        method="combined", weights={"ce": 0.5, "logit": 0.4, "feature": 0.2, "attention": 10.0}, **FEATURE_CFG
    ),
}


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_objective_equals_the_hand_computed_weighted_sum(method):
    cfg = METHOD_CONFIGS[method]
    obj = from_config(cfg)
    regressors = obj.init_regressors(STUDENT_SHAPES, TEACHER_SHAPES, seed=1)
    s_logits, s_feats, y, t_logits, t_feats = tensors()
    loss, metrics = obj(s_logits, s_feats, y, t_logits, t_feats, regressors)

    weights = cfg.term_weights()
    terms = expected_terms(obj, regressors, s_logits, s_feats, y, t_logits, t_feats)
    expected = sum(w * terms[k] for k, w in weights.items())
    torch.testing.assert_close(loss, expected)
    assert metrics.keys() == {*weights, "loss"}
    for k in weights:
        torch.testing.assert_close(metrics[k], terms[k], msg=k)
    torch.testing.assert_close(metrics["loss"], expected)
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in metrics.values())


def test_objective_is_differentiable_in_student_outputs_and_regressors():
    obj = from_config(METHOD_CONFIGS["combined"])
    regressors = obj.init_regressors(STUDENT_SHAPES, TEACHER_SHAPES)
    s_logits, s_feats, y, t_logits, t_feats = tensors()

    def loss_of(s_logits, s_feats, regressors):
        return obj(s_logits, s_feats, y, t_logits, t_feats, regressors)[0]

    g_logits, g_feats, g_regs = torch.func.grad(loss_of, argnums=(0, 1, 2))(s_logits, s_feats, regressors)
    assert g_logits.abs().sum() > 0
    assert g_feats["block1"].abs().sum() > 0 and g_feats["block2"].abs().sum() > 0
    assert g_feats["pool"].abs().sum() == 0  # not paired
    assert all(g["weight"].abs().sum() > 0 for g in g_regs.values())


def test_zero_weight_terms_are_not_computed():
    obj = Objective(weights={"ce": 1.0, "logit": 0.0, "feature": 0.0, "attention": 0.0},
                    pairs=(("block1", "layer1"),))
    s_logits, s_feats, y, _, _ = tensors()
    assert not obj.needs_teacher and not obj.needs_features and not obj.needs_regressors

    def never(*args, **kwargs):
        raise AssertionError("a zero-weight term was computed")

    with mock.patch.multiple(losses, soft_target_kl=never, fitnet_hint=never, attention_transfer=never):
        # No teacher outputs and no regressors at all: nothing that needs them may run.
        loss, metrics = obj(s_logits, s_feats, y, None, None, None)
    assert set(metrics) == {"ce", "loss"}
    torch.testing.assert_close(loss, losses.cross_entropy(s_logits, y))

    obj = Objective(weights={"ce": 0.0, "logit": 1.0}, temperature=2.0)
    s_logits, s_feats, y, t_logits, _ = tensors()
    with mock.patch.object(losses, "cross_entropy", never):
        loss, metrics = obj(s_logits, s_feats, y, t_logits, {}, {})
    assert set(metrics) == {"logit", "loss"}
    torch.testing.assert_close(loss, losses.soft_target_kl(s_logits, t_logits, 2.0))


# --- regressors and pair checks -------------------------------------------------------------------


def test_one_regressor_per_pair_with_conv_shapes():
    obj = from_config(METHOD_CONFIGS["feature"])
    regs = obj.init_regressors(STUDENT_SHAPES, TEACHER_SHAPES, seed=0)
    assert set(regs) == {pair_key("block1", "layer1"), pair_key("block2", "layer2")} == {
        "block1->layer1", "block2->layer2"}
    assert regs["block1->layer1"]["weight"].shape == (16, 4, 1, 1)
    assert regs["block1->layer1"]["bias"].shape == (16,)
    assert regs["block2->layer2"]["weight"].shape == (32, 8, 1, 1)
    assert regs["block2->layer2"]["bias"].shape == (32,)
    assert all(not t.requires_grad for r in regs.values() for t in r.values())


def test_regressors_are_deterministic_for_a_seed():
    obj = from_config(METHOD_CONFIGS["feature"])
    a = obj.init_regressors(STUDENT_SHAPES, TEACHER_SHAPES, seed=7)
    b = obj.init_regressors(STUDENT_SHAPES, TEACHER_SHAPES, seed=7)
    c = obj.init_regressors(STUDENT_SHAPES, TEACHER_SHAPES, seed=8)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    obj.init_regressors(STUDENT_SHAPES, TEACHER_SHAPES, seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # seeded by its own generator
    for key in a:
        for name in ("weight", "bias"):
            assert torch.equal(a[key][name], b[key][name])
            assert not torch.equal(a[key][name], c[key][name])
    # Two pairs with the same shapes still get different weights.
    twin = Objective(weights={"feature": 1.0}, pairs=(("block1", "layer1"), ("block1", "layer1x")))
    regs = twin.init_regressors(STUDENT_SHAPES, {**TEACHER_SHAPES, "layer1x": (16, 8, 8)})
    assert not torch.equal(regs["block1->layer1"]["weight"], regs["block1->layer1x"]["weight"])


def test_vector_pairs_get_linear_regressors():
    obj = Objective(weights={"ce": 1.0, "feature": 1.0}, pairs=(("pool", "avgpool"),))
    regs = obj.init_regressors(STUDENT_SHAPES, TEACHER_SHAPES)
    assert regs["pool->avgpool"]["weight"].shape == (32, 8)
    s_logits, s_feats, y, t_logits, t_feats = tensors()
    loss, metrics = obj(s_logits, s_feats, y, t_logits, t_feats, regs)
    torch.testing.assert_close(
        metrics["feature"], losses.fitnet_hint(s_feats["pool"], t_feats["avgpool"], regs["pool->avgpool"])
    )


def test_no_regressors_without_a_feature_term():
    obj = from_config(METHOD_CONFIGS["attention"])
    assert obj.init_regressors(STUDENT_SHAPES, TEACHER_SHAPES) == {}


@pytest.mark.parametrize("pair", [("block1", "avgpool"), ("pool", "layer1")])
def test_spatial_vector_mismatch_raises_config_error_saying_why(pair):
    obj = Objective(weights={"ce": 1.0, "feature": 0.3}, pairs=(pair,))
    with pytest.raises(ConfigError) as err:
        obj.init_regressors(STUDENT_SHAPES, TEACHER_SHAPES)
    msg = str(err.value)
    assert pair[0] in msg and pair[1] in msg
    assert "spatial" in msg and "vector" in msg
    with pytest.raises(ConfigError):
        check_pairs(obj, STUDENT_SHAPES, TEACHER_SHAPES)


def test_attention_with_vector_features_raises_config_error():
    obj = Objective(weights={"ce": 1.0, "attention": 1.0}, pairs=(("pool", "avgpool"),))
    with pytest.raises(ConfigError) as err:
        check_pairs(obj, STUDENT_SHAPES, TEACHER_SHAPES)
    msg = str(err.value)
    assert "attention" in msg and "pool" in msg and "spatial" in msg
    with pytest.raises(ConfigError, match="attention"):
        obj.init_regressors(STUDENT_SHAPES, TEACHER_SHAPES)


def test_features_of_other_ranks_raise_config_error():
    obj = Objective(weights={"feature": 1.0}, pairs=(("tokens", "layer1"),))
    with pytest.raises(ConfigError, match="tokens"):
        check_pairs(obj, {"tokens": (16, 4)}, TEACHER_SHAPES)


def test_pairs_are_not_checked_when_no_term_uses_features():
    obj = Objective(weights={"ce": 1.0, "feature": 0.0}, pairs=(("pool", "layer1"),))
    check_pairs(obj, STUDENT_SHAPES, TEACHER_SHAPES)  # would be a mismatch, but nothing uses it
    assert obj.init_regressors(STUDENT_SHAPES, TEACHER_SHAPES) == {}
