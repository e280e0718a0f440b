"""Tests for fkd.objective: presets expand to term tables, the objective's value against the
hand-computed weighted sum of fkd.losses terms, term parameters (FitNets regressors), pair checks, and
the errors of [distill.terms] tables."""

from __future__ import annotations

from unittest import mock

import attrs
import pytest
import torch

from fkd import losses
from fkd.config import DistillConfig
from fkd.errors import ConfigError
from fkd.objective import Objective, build, from_config, from_weights, term_tables
from fkd.terms import TERMS, Shapes, Term, TermInputs, pair_key, register_term

B, K = 4, 10
STUDENT_SHAPES = {"block1": (4, 8, 8), "block2": (8, 4, 4), "pool": (8,)}
TEACHER_SHAPES = {"layer1": (16, 8, 8), "layer2": (32, 2, 2), "avgpool": (32,)}
SHAPES = Shapes(STUDENT_SHAPES, TEACHER_SHAPES, num_classes=K, num_examples=100)
FEATURE_CFG = {"student_features": ["block1", "block2"], "teacher_features": ["layer1", "layer2"]}


def tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(B, K, generator=g)
    t_logits = 2 * torch.randn(B, K, generator=g)
    y = torch.randint(0, K, (B,), generator=g)
    s_feats = {k: torch.randn(B, *v, generator=g) for k, v in STUDENT_SHAPES.items()}
    t_feats = {k: torch.randn(B, *v, generator=g) for k, v in TEACHER_SHAPES.items()}
    return s_logits, s_feats, y, t_logits, t_feats


def inputs(s_logits, s_feats, y, t_logits, t_feats) -> TermInputs:
    return TermInputs(s_logits, s_feats, y, t_logits, t_feats, torch.arange(B), torch.zeros((), dtype=torch.int64))


def shapes(student=STUDENT_SHAPES, teacher=TEACHER_SHAPES) -> Shapes:
    return Shapes(student, teacher, num_classes=K, num_examples=100)


# --- presets expand to term tables ------------------------------------------------------------------


def test_presets_expand_to_term_tables():
    def tables(method, **kw):
        return term_tables(DistillConfig(method=method, **kw))

    assert tables("none") == {"ce": {"weight": 1.0}}
    t = tables("logit", alpha=0.7, temperature=3.0)
    assert t["ce"]["weight"] == pytest.approx(0.3) and t["logit"] == {"weight": 0.7, "temperature": 3.0}
    assert tables("feature") == {"ce": {"weight": 0.7}, "feature": {"weight": 0.3}}  # the notebook's 0.7 CE + 0.3 MSE
    assert tables("feature", alpha=0.5, beta=2.0) == {"ce": {"weight": 0.5}, "feature": {"weight": 2.0}}
    # Zagoruyko & Komodakis: CE plus beta * AT; alpha is not used.
    assert tables("attention", beta=250.0) == {"ce": {"weight": 1.0}, "attention": {"weight": 250.0, "p": 2.0}}
    assert tables("attention", alpha=0.1, beta=250.0) == tables("attention", alpha=0.9, beta=250.0)
    combined = tables("combined", weights={"ce": 1, "logit": 0.5, "feature": 0.25, "attention": 100},
                      temperature=4.0, attention_p=3.0)
    assert combined == {"ce": {"weight": 1.0}, "logit": {"weight": 0.5, "temperature": 4.0},
                        "feature": {"weight": 0.25}, "attention": {"weight": 100.0, "p": 3.0}}
    assert all(type(t["weight"]) is float for t in combined.values())
    written = {"ce": {"weight": 0.2}, "logit": {"weight": 0.8, "temperature": 5.0}}
    assert tables("terms", terms=written) == written


def test_from_config_carries_weights_temperature_pairs_and_p():
    cfg = DistillConfig(method="attention", beta=3.0, temperature=4.0, attention_p=1.5, **FEATURE_CFG)
    obj = from_config(cfg)
    assert obj.weights == {"ce": 1.0, "attention": 3.0}
    attention = obj.terms[1].term
    assert attention.p == 1.5 and attention.pairs == (("block1", "layer1"), ("block2", "layer2"))
    assert obj.student_feature_names == ("block1", "block2") and obj.teacher_feature_names == ("layer1", "layer2")
    assert obj.needs_teacher and obj.needs_features and not obj.needs_teacher_logits
    base = from_config(DistillConfig(method="none"))
    assert not base.needs_teacher and not base.needs_features and base.teacher_feature_names == ()
    logit = from_config(DistillConfig(method="logit", temperature=4.0))
    assert logit.needs_teacher_logits and not logit.needs_features and logit.terms[1].term.temperature == 4.0


def test_from_config_needs_feature_pairs_for_feature_terms():
    with pytest.raises(ConfigError, match="student_features"):
        from_config(DistillConfig(method="feature"))
    with pytest.raises(ConfigError, match="student_features"):
        from_config(DistillConfig(method="combined", weights={"ce": 1.0, "attention": 1.0}))
    # A feature term with weight zero is dropped, so it needs no pairs.
    assert from_config(DistillConfig(method="combined", weights={"ce": 1.0, "feature": 0.0})).weights == {"ce": 1.0}


# --- [distill.terms] tables ------------------------------------------------------------------------------


def test_terms_tables_build_the_objective():
    cfg = DistillConfig(method="terms", terms={"ce": {"weight": 0.25}, "logit": {"weight": 0.75, "temperature": 4.0}})
    obj = from_config(cfg)
    assert obj.weights == {"ce": 0.25, "logit": 0.75} and obj.terms[1].term.temperature == 4.0
    # The same objective as the preset that says the same thing.
    preset = from_config(DistillConfig(method="logit", alpha=0.75, temperature=4.0))
    assert preset == obj


@pytest.mark.parametrize("terms, message", [
    ({"klx": {"weight": 1.0}}, "unknown loss term 'klx' in distill.terms; valid terms: ce, logit"),
    ({"logit": {"temprature": 4.0}}, "unknown key 'temprature' in distill.terms.logit; valid keys: weight, weight_schedule, teacher, temperature, student_head"),
    ({"logit": {"temperature": 0.0}}, "distill.terms.logit.temperature must be > 0"),
    ({"logit": {"temperature": "hot"}}, "distill.terms.logit.temperature must be a number"),
    ({"ce": {"weight": -1.0}}, "distill.terms.ce.weight must be a number >= 0"),
    ({"ce": {"weight": 0.0}}, "every term in distill.terms has weight 0"),
    ({"ce": 1.0}, "distill.terms.ce must be a table"),
    ({"feature": {"pairs": [["a", "b"]]}}, "unknown key 'pairs' in distill.terms.feature"),
])
def test_bad_term_tables_fail_with_the_dotted_key_and_the_valid_choices(terms, message):
    with pytest.raises(ConfigError) as err:
        from_config(DistillConfig(method="terms", terms=terms))
    assert message in str(err.value)


def test_terms_tables_and_method_must_agree():
    with pytest.raises(ConfigError, match="set distill.method = 'terms'"):
        from_config(DistillConfig(method="logit", terms={"ce": {"weight": 1.0}}))
    with pytest.raises(ConfigError, match=r"needs at least one \[distill.terms.<name>\]"):
        from_config(DistillConfig(method="terms"))


def test_from_weights_gives_each_term_its_own_keys():
    obj = from_weights({"ce": 0.5, "logit": 0.5, "attention": 2.0}, pairs=(("block1", "layer1"),),
                       temperature=3.0, p=1.0)
    assert obj.terms[1].term.temperature == 3.0 and obj.terms[2].term.p == 1.0
    with pytest.raises(ConfigError, match="takes temperature"):
        from_weights({"ce": 1.0}, temperature=3.0)


# --- the objective's value ------------------------------------------------------------------------


def expected_terms(cfg: DistillConfig, params, s_logits, s_feats, y, t_logits, t_feats) -> dict:
    """Each term computed directly with fkd.losses, independently of Objective and the term classes."""
    pairs = list(zip(cfg.student_features, cfg.teacher_features))
    tables = term_tables(cfg)  # the preset's numbers, as expanded into the term tables
    temperature = tables.get("logit", {}).get("temperature", 2.0)
    attention_p = tables.get("attention", {}).get("p", 2.0)
    terms = {
        "ce": losses.cross_entropy(s_logits, y),
        "logit": losses.soft_target_kl(s_logits, t_logits, temperature),
    }
    if "feature" in params:
        hints = [losses.fitnet_hint(s_feats[s], t_feats[t], params["feature"][f"{s}->{t}"]) for s, t in pairs]
        terms["feature"] = sum(hints) / len(hints)
    if pairs:
        terms["attention"] = sum(
            losses.attention_transfer(s_feats[s], t_feats[t], p=attention_p) for s, t in pairs
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
    params, state = obj.init(SHAPES, seed=1)
    s_logits, s_feats, y, t_logits, t_feats = tensors()
    loss, metrics, new_state = obj(params, state, inputs(s_logits, s_feats, y, t_logits, t_feats))

    weights = {k: t["weight"] for k, t in term_tables(cfg).items()}
    terms = expected_terms(cfg, params, s_logits, s_feats, y, t_logits, t_feats)
    expected = sum(w * terms[k] for k, w in weights.items())
    torch.testing.assert_close(loss, expected)
    assert metrics.keys() == {*weights, "loss"}
    for k in weights:
        torch.testing.assert_close(metrics[k], terms[k], msg=k)
    torch.testing.assert_close(metrics["loss"], expected)
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in metrics.values())
    assert new_state == state == {k: {} for k in weights}  # the built-in terms keep no state


def test_objective_is_differentiable_in_student_outputs_and_term_params():
    obj = from_config(METHOD_CONFIGS["combined"])
    params, state = obj.init(SHAPES)
    s_logits, s_feats, y, t_logits, t_feats = tensors()

    def loss_of(s_logits, s_feats, params):
        return obj(params, state, inputs(s_logits, s_feats, y, t_logits, t_feats))[0]

    g_logits, g_feats, g_params = torch.func.grad(loss_of, argnums=(0, 1, 2))(s_logits, s_feats, params)
    assert g_logits.abs().sum() > 0
    assert g_feats["block1"].abs().sum() > 0 and g_feats["block2"].abs().sum() > 0
    assert g_feats["pool"].abs().sum() == 0  # not paired
    assert all(g["weight"].abs().sum() > 0 for g in g_params["feature"].values())


def test_zero_weight_terms_are_not_computed():
    obj = from_weights({"ce": 1.0, "logit": 0.0, "feature": 0.0, "attention": 0.0}, pairs=(("block1", "layer1"),))
    s_logits, s_feats, y, _, _ = tensors()
    assert not obj.needs_teacher and not obj.needs_features and obj.init(SHAPES) == ({"ce": {}}, {"ce": {}})

    def never(*args, **kwargs):
        raise AssertionError("a zero-weight term was computed")

    with mock.patch.multiple(losses, soft_target_kl=never, fitnet_hint=never, attention_transfer=never):
        # No teacher outputs and no term params at all: nothing that needs them may run.
        loss, metrics, _ = obj({}, {}, inputs(s_logits, s_feats, y, None, {}))
    assert set(metrics) == {"ce", "loss"}
    torch.testing.assert_close(loss, losses.cross_entropy(s_logits, y))

    obj = from_weights({"ce": 0.0, "logit": 1.0}, temperature=2.0)
    s_logits, s_feats, y, t_logits, _ = tensors()
    with mock.patch.object(losses, "cross_entropy", never):
        loss, metrics, _ = obj({}, {}, inputs(s_logits, s_feats, y, t_logits, {}))
    assert set(metrics) == {"logit", "loss"}
    torch.testing.assert_close(loss, losses.soft_target_kl(s_logits, t_logits, 2.0))


def test_what_the_teacher_must_provide_follows_from_what_the_terms_consume():
    # A logits-only term under any name needs the teacher's logits (not only a term called "logit").
    @register_term("test_scaled_kl")
    @attrs.frozen
    class ScaledKL(Term):
        consumes = frozenset({"student_logits", "teacher_logits"})

        def apply(self, params, state, inputs):
            return 0.5 * losses.soft_target_kl(inputs.student_logits, inputs.teacher_logits, 1.0), state

    obj = build({"ce": {"weight": 1.0}, "test_scaled_kl": {"weight": 1.0}})
    assert obj.needs_teacher_logits and obj.needs_teacher and not obj.needs_teacher_features
    features_only = from_weights({"ce": 1.0, "feature": 1.0}, pairs=(("block1", "layer1"),))
    assert features_only.needs_teacher_features and not features_only.needs_teacher_logits
    assert "test_scaled_kl" in TERMS.names()


# --- FitNets regressors and pair checks ----------------------------------------------------------------


def test_one_regressor_per_pair_with_conv_shapes():
    obj = from_config(METHOD_CONFIGS["feature"])
    regs = obj.init(SHAPES, seed=0)[0]["feature"]
    assert set(regs) == {pair_key("block1", "layer1"), pair_key("block2", "layer2")} == {
        "block1->layer1", "block2->layer2"}
    assert regs["block1->layer1"]["weight"].shape == (16, 4, 1, 1)
    assert regs["block1->layer1"]["bias"].shape == (16,)
    assert regs["block2->layer2"]["weight"].shape == (32, 8, 1, 1)
    assert regs["block2->layer2"]["bias"].shape == (32,)
    assert all(not t.requires_grad for r in regs.values() for t in r.values())


def test_regressors_are_deterministic_for_a_seed():
    obj = from_config(METHOD_CONFIGS["feature"])
    a, b, c = (obj.init(SHAPES, seed=s)[0]["feature"] for s in (7, 7, 8))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    obj.init(SHAPES, seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # seeded by its own generator
    for key in a:
        for name in ("weight", "bias"):
            assert torch.equal(a[key][name], b[key][name])
            assert not torch.equal(a[key][name], c[key][name])
    # Two pairs with the same shapes still get different weights.
    twin = from_weights({"feature": 1.0}, pairs=(("block1", "layer1"), ("block1", "layer1x")))
    regs = twin.init(shapes(teacher={**TEACHER_SHAPES, "layer1x": (16, 8, 8)}))[0]["feature"]
    assert not torch.equal(regs["block1->layer1"]["weight"], regs["block1->layer1x"]["weight"])


def test_vector_pairs_get_linear_regressors():
    obj = from_weights({"ce": 1.0, "feature": 1.0}, pairs=(("pool", "avgpool"),))
    params, state = obj.init(SHAPES)
    regs = params["feature"]
    assert regs["pool->avgpool"]["weight"].shape == (32, 8)
    s_logits, s_feats, y, t_logits, t_feats = tensors()
    _, metrics, _ = obj(params, state, inputs(s_logits, s_feats, y, t_logits, t_feats))
    torch.testing.assert_close(
        metrics["feature"], losses.fitnet_hint(s_feats["pool"], t_feats["avgpool"], regs["pool->avgpool"])
    )


def test_no_params_without_a_feature_term():
    obj = from_config(METHOD_CONFIGS["attention"])
    assert obj.init(SHAPES) == ({"ce": {}, "attention": {}}, {"ce": {}, "attention": {}})


@pytest.mark.parametrize("pair", [("block1", "avgpool"), ("pool", "layer1")])
def test_spatial_vector_mismatch_raises_config_error_saying_why(pair):
    obj = from_weights({"ce": 1.0, "feature": 0.3}, pairs=(pair,))
    with pytest.raises(ConfigError) as err:
        obj.init(SHAPES)
    msg = str(err.value)
    assert pair[0] in msg and pair[1] in msg
    assert "spatial" in msg and "vector" in msg
    with pytest.raises(ConfigError):
        obj.check(SHAPES)


def test_attention_with_vector_features_raises_config_error():
    obj = from_weights({"ce": 1.0, "attention": 1.0}, pairs=(("pool", "avgpool"),))
    with pytest.raises(ConfigError) as err:
        obj.check(SHAPES)
    msg = str(err.value)
    assert "attention" in msg and "pool" in msg and "spatial" in msg


def test_features_of_other_ranks_raise_config_error():
    obj = from_weights({"feature": 1.0}, pairs=(("tokens", "layer1"),))
    with pytest.raises(ConfigError, match="tokens"):
        obj.check(shapes(student={"tokens": (16, 4)}))


def test_pairs_are_not_checked_when_no_term_uses_features():
    obj = from_weights({"ce": 1.0, "feature": 0.0}, pairs=(("pool", "layer1"),))
    obj.check(SHAPES)  # would be a mismatch, but nothing uses it
    assert obj.init(SHAPES) == ({"ce": {}}, {"ce": {}})


def test_objective_is_an_equal_value_for_equal_configs():
    assert isinstance(from_config(METHOD_CONFIGS["feature"]), Objective)
    assert from_config(METHOD_CONFIGS["feature"]) == from_config(METHOD_CONFIGS["feature"])


def test_a_missing_input_names_the_term_that_needs_it():
    obj = from_weights({"ce": 0.5, "logit": 0.5})
    s_logits, s_feats, y, _, _ = tensors()
    with pytest.raises(ValueError, match="'logit' term consumes teacher_logits"):
        obj({}, {}, inputs(s_logits, s_feats, y, None, {}))
