"""Tests for the issue-20 feature terms (reviewkd, fsp, ab, ofd, srrl, kdsvd) and the framework pieces they
brought: per-term feature lists, pre-activation features, teacher constants at init (Shapes.teacher_params),
the teacher's head as a function, and term weight schedules. Each method config trains from the CLI on digits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch._dynamo.testing import CompileCounter
from torch.func import grad, vmap

from fkd import cli, losses
from fkd.checkpoint import load_checkpoint
from fkd.errors import ConfigError
from fkd.models import build_model
from fkd.objective import build
from fkd.terms import Shapes, TermInputs, WeightSchedule, pair_key
from fkd.terms.connected import layer_weights
from fkd.terms.weight_schedule import parse

ROOT = Path(__file__).resolve().parents[1]
B, K = 6, 5
S_SHAPES = {"a": (4, 8, 8), "b": (8, 4, 4), "c": (16, 2, 2), "embedding": (16,)}
T_SHAPES = {"x": (6, 8, 8), "y": (12, 4, 4), "z": (16, 2, 2), "embedding": (20,),
            "x4": (4, 8, 8), "y8": (8, 4, 4), "z16": (16, 2, 2)}
g0 = torch.Generator().manual_seed(5)
TEACHER_PARAMS = {"bn_x.weight": torch.randn(6, generator=g0), "bn_x.bias": torch.randn(6, generator=g0),
                  "bn_y.weight": torch.randn(12, generator=g0), "bn_y.bias": torch.randn(12, generator=g0),
                  "fc.weight": torch.randn(K, 20, generator=g0), "fc.bias": torch.randn(K, generator=g0)}
SHAPES = Shapes(S_SHAPES, T_SHAPES, num_classes=K, num_examples=100, teacher_params=TEACHER_PARAMS,
                teacher_head="fc")


def make_inputs(seed=0, epoch=1.0) -> TermInputs:
    g = torch.Generator().manual_seed(seed)
    s = {k: torch.randn(B, *v, generator=g) for k, v in S_SHAPES.items()}
    t = {k: torch.randn(B, *v, generator=g) for k, v in T_SHAPES.items()}
    return TermInputs(torch.randn(B, K, generator=g), s, torch.randint(0, K, (B,), generator=g),
                      torch.randn(B, K, generator=g), t, torch.arange(B), torch.zeros((), dtype=torch.int64),
                      epoch=torch.tensor(float(epoch)))


def one(name, **table):
    objective = build({name: {"weight": 1.0, **table}})
    params, state = objective.init(SHAPES)
    return objective, params, state


def value(objective, params, state, inputs, name):
    return objective(params, state, inputs)[1][name]


# --- each term computes its function ----------------------------------------------------------------


def test_fsp_term_sums_consecutive_flows():
    obj, p, s = one("fsp", student_features=["a", "b", "c"], teacher_features=["x4", "y8", "z16"])
    i = make_inputs()
    sf, tf = i.student_features, i.teacher_features
    expected = losses.fsp(sf["a"], sf["b"], tf["x4"], tf["y8"]) + losses.fsp(sf["b"], sf["c"], tf["y8"], tf["z16"])
    assert torch.allclose(value(obj, p, s, i, "fsp"), expected)


def test_fsp_term_refuses_unequal_widths_and_a_single_pair():
    with pytest.raises(ConfigError, match="equal channel counts"):
        one("fsp", student_features=["a", "b"], teacher_features=["x", "y"])
    with pytest.raises(ConfigError, match="two or more"):
        one("fsp", student_features=["a"], teacher_features=["x4"])


def test_kdsvd_term_is_the_function_over_its_pairs():
    obj, p, s = one("kdsvd", k=2, student_features=["a", "b"], teacher_features=["x", "y"])
    i = make_inputs()
    expected = losses.kdsvd([i.student_features["a"], i.student_features["b"]],
                            [i.teacher_features["x"], i.teacher_features["y"]], k=2)
    assert torch.allclose(value(obj, p, s, i, "kdsvd"), expected)
    with pytest.raises(ConfigError, match="equal width"):
        one("kdsvd", student_features=["a", "b"], teacher_features=["x", "z"])


def test_ab_term_connects_weights_layers_and_trains_its_connectors():
    obj, p, s = one("ab", margin=0.5, student_features=["a", "b"], teacher_features=["x", "y"])
    assert p["ab"][pair_key("a", "x")]["weight"].shape == (6, 4, 1, 1)
    i = make_inputs()
    expected = sum(w * losses.ab(losses.conv_bn(i.student_features[a], p["ab"][pair_key(a, t)]),
                                 i.teacher_features[t], margin=0.5)
                   for w, (a, t) in zip([0.5, 1.0], [("a", "x"), ("b", "y")]))
    assert torch.allclose(value(obj, p, s, i, "ab"), expected)
    grads = grad(lambda q: obj(q, s, i)[0])(p)
    assert all(g.abs().sum() > 0 for g in grads["ab"][pair_key("b", "y")].values())
    assert layer_weights(3) == [0.25, 0.5, 1.0]
    with pytest.raises(ConfigError, match="same resolution"):
        one("ab", student_features=["a"], teacher_features=["y"])


def test_ofd_term_takes_its_margins_from_the_teachers_batchnorms():
    obj, p, s = one("ofd", student_features=["a", "b"], teacher_features=["x", "y"], teacher_bn=["bn_x", "bn_y"])
    margin = s["ofd"]["margins"][pair_key("a", "x")]
    assert torch.allclose(margin, losses.ofd_margin(TEACHER_PARAMS["bn_x.weight"], TEACHER_PARAMS["bn_x.bias"]))
    i = make_inputs()
    expected = sum(w * losses.ofd(losses.conv_bn(i.student_features[a], p["ofd"][pair_key(a, t)]),
                                  i.teacher_features[t], s["ofd"]["margins"][pair_key(a, t)])
                   for w, (a, t) in zip([0.5, 1.0], [("a", "x"), ("b", "y")]))
    loss, _, new_state = obj(p, s, i)
    assert torch.allclose(obj(p, s, i)[1]["ofd"], expected)
    assert torch.equal(new_state["ofd"]["margins"][pair_key("a", "x")], margin)  # a constant


def test_ofd_term_refuses_missing_or_mismatched_batchnorms():
    with pytest.raises(ConfigError, match="names 1 BatchNorm layers for 2 feature pairs"):
        one("ofd", student_features=["a", "b"], teacher_features=["x", "y"], teacher_bn=["bn_x"])
    with pytest.raises(ConfigError, match=r"'bn_q.weight', which the teacher does not have; did you mean"):
        one("ofd", student_features=["a"], teacher_features=["x"], teacher_bn=["bn_q"])
    with pytest.raises(ConfigError, match="has \\(12,\\) channels but teacher feature 'x' has 6"):
        one("ofd", student_features=["a"], teacher_features=["x"], teacher_bn=["bn_y"])


def test_srrl_term_reads_through_a_frozen_copy_of_the_teachers_head():
    obj, p, s = one("srrl", student_feature="b", logit_weight=0.5)
    head = s["srrl"]["head"]
    assert torch.equal(head["weight"], TEACHER_PARAMS["fc.weight"]) and head["weight"] is not TEACHER_PARAMS["fc.weight"]
    i = make_inputs()
    connected = losses.conv_bn(i.student_features["b"], p["srrl"]["connector"], relu=True)
    z = connected.mean((2, 3)) @ TEACHER_PARAMS["fc.weight"].T + TEACHER_PARAMS["fc.bias"]
    expected = losses.srrl(connected, i.teacher_features["embedding"], z, i.teacher_logits, logit_weight=0.5)
    assert torch.allclose(value(obj, p, s, i, "srrl"), expected)
    # gradients reach the connector; the head is state, not trained
    grads = grad(lambda q: obj(q, s, i)[0])(p)
    assert grads["srrl"]["connector"]["weight"].abs().sum() > 0 and "head" not in p["srrl"]


def test_srrl_needs_the_teachers_head_and_its_input():
    with pytest.raises(ConfigError, match="teacher's head is not known"):
        build({"srrl": {}}).init(Shapes(S_SHAPES, T_SHAPES, K, 10))
    with pytest.raises(ConfigError, match="name the feature the head reads"):
        one("srrl", teacher_feature="z")


def test_reviewkd_term_fuses_deep_to_shallow_and_trains_every_abf():
    obj, p, s = one("reviewkd", student_features=["a", "b", "embedding"], teacher_features=["x", "y", "embedding"])
    abfs = p["reviewkd"]
    assert "att_weight" not in abfs[pair_key("embedding", "embedding")]  # the deepest level is not fused
    assert abfs[pair_key("a", "x")]["conv1"].shape == (16, 4, 1, 1)  # mid = min(512, the deepest student width)
    i = make_inputs()
    sf, tf = i.student_features, i.teacher_features
    out3, res = losses.abf(sf["embedding"], None, abfs[pair_key("embedding", "embedding")], (1, 1))
    out2, res = losses.abf(sf["b"], res, abfs[pair_key("b", "y")], (4, 4))
    out1, _ = losses.abf(sf["a"], res, abfs[pair_key("a", "x")], (8, 8))
    expected = losses.hcl([out1, out2, out3], [tf["x"], tf["y"], tf["embedding"][:, :, None, None]])
    assert torch.allclose(value(obj, p, s, i, "reviewkd"), expected)
    grads = grad(lambda q: obj(q, s, i)[0])(p)
    assert all(g.abs().sum() > 0 for level in grads["reviewkd"].values() for g in level.values())


@pytest.mark.parametrize("name, table", [
    ("ab", {"student_features": ["a", "b"], "teacher_features": ["x", "y"]}),
    ("ofd", {"student_features": ["a"], "teacher_features": ["x"], "teacher_bn": ["bn_x"]}),
    ("srrl", {"student_feature": "b"}),
    ("reviewkd", {"student_features": ["a", "embedding"], "teacher_features": ["x", "embedding"]}),
])
def test_terms_vmap_over_stacked_students_equal_a_loop(name, table):
    """A sweep stacks the students' term params and state (vmap); each member equals its own call."""
    obj = build({name: {"weight": 1.0, **table}})
    members = [obj.init(SHAPES, seed=k) for k in range(3)]
    stacked_p = torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *[m[0] for m in members])
    stacked_s = torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *[m[1] for m in members])
    i = make_inputs()
    batched = vmap(lambda p, s: obj(p, s, i)[0])(stacked_p, stacked_s)
    loop = torch.stack([obj(p, s, i)[0] for p, s in members])
    assert torch.allclose(batched, loop, rtol=1e-5, atol=1e-6)


# --- per-term feature lists -----------------------------------------------------------------------------


def test_a_terms_own_feature_lists_override_the_shared_pairs_and_models_return_the_union():
    obj = build({"feature": {}, "attention": {"student_features": ["b", "c"], "teacher_features": ["y", "z"]}},
                pairs=(("a", "x"),))
    by_name = {t.name: t.term for t in obj.terms}
    assert by_name["feature"].pairs == (("a", "x"),)
    assert by_name["attention"].pairs == (("b", "y"), ("c", "z"))
    assert obj.student_feature_names == ("a", "b", "c") and obj.teacher_feature_names == ("x", "y", "z")


@pytest.mark.parametrize("table, message", [
    ({"student_features": ["a"]}, "given without distill.terms.attention.teacher_features"),
    ({"student_features": ["a", "b"], "teacher_features": ["x"]}, "has 2 names but"),
    ({"student_features": "a", "teacher_features": ["x"]}, "must be a non-empty list of feature names"),
])
def test_bad_feature_lists_name_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        build({"attention": table})


def test_a_term_without_features_says_where_to_give_them():
    from fkd.config import DistillConfig

    with pytest.raises(ConfigError, match="or the term's own student_features and teacher_features"):
        from fkd.objective import from_config
        from_config(DistillConfig(method="terms", terms={"ab": {}}))


# --- weight schedules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("table, expected", [
    ({"kind": "warmup", "epochs": 4}, [0.0, 0.25, 0.75, 1.0, 1.0]),
    ({"kind": "until", "epochs": 3}, [1.0, 1.0, 0.0, 0.0, 0.0]),
    ({"kind": "after", "epochs": 3}, [0.0, 0.0, 1.0, 1.0, 1.0]),
    ({"kind": "linear", "epochs": 4, "start": 1.0, "end": 0.5}, [1.0, 0.875, 0.625, 0.5, 0.5]),
    ({"kind": "cosine", "epochs": 2, "start": 0.0, "end": 2.0}, [0.0, 1.0, 2.0, 2.0, 2.0]),
])
def test_weight_schedule_factors(table, expected):
    schedule = parse(table, "w")
    factors = [schedule(torch.tensor(e)).item() for e in (0.0, 1.0, 3.0, 4.0, 9.0)]
    assert factors == pytest.approx(expected, abs=1e-6)


def test_cosine_schedule_is_ctkds_lambda():
    """CTKD's lambda(e) = min + (max - min)(1 - cos(pi clip(e, 0, N) / N)) / 2 is the cosine kind."""
    s = WeightSchedule("cosine", 10.0, 0.0, 1.0)
    for e in (0.0, 2.5, 5.0, 7.0, 12.0):
        ref = (1 - math.cos(math.pi * min(max(e, 0), 10) / 10)) / 2
        assert s(torch.tensor(e)).item() == pytest.approx(ref, abs=1e-6)


def test_the_objective_scales_the_weight_not_the_metric():
    obj = build({"ce": {}, "logit": {"weight": 2.0, "temperature": 4.0, "weight_schedule": {"kind": "warmup", "epochs": 4}}})
    for epoch in (0.0, 1.0, 8.0):
        i = make_inputs(epoch=epoch)
        loss, metrics, _ = obj({}, {}, i)
        factor = min(epoch / 4, 1.0)
        assert torch.allclose(loss, metrics["ce"] + 2.0 * factor * metrics["logit"])
        assert torch.allclose(metrics["logit"], losses.soft_target_kl(i.student_logits, i.teacher_logits, 4.0))


def test_dkds_warmup_epochs_is_a_warmup_schedule():
    old = build({"dkd": {"warmup_epochs": 4.0}})
    new = build({"dkd": {"weight_schedule": {"kind": "warmup", "epochs": 4.0}}})
    assert old.terms[0].schedule == new.terms[0].schedule == WeightSchedule("warmup", 4.0)
    i = make_inputs(epoch=1.0)
    assert torch.equal(old({}, {}, i)[0], new({}, {}, i)[0])
    with pytest.raises(ConfigError, match="keep one of them"):
        build({"dkd": {"warmup_epochs": 4.0, "weight_schedule": {"kind": "until", "epochs": 2}}})


def test_scheduled_weights_vmap_with_a_sweeps_weights_and_trace_once():
    obj = build({"ce": {}, "logit": {"weight_schedule": {"kind": "until", "epochs": 2}}})
    weights = torch.tensor([0.5, 1.0, 2.0])
    for epoch in (1.0, 3.0):
        i = make_inputs(epoch=epoch)
        batched = vmap(lambda w: obj({}, {}, i, {"logit": {"weight": w}})[0])(weights)
        loop = torch.stack([obj({}, {}, i, {"logit": {"weight": w}})[0] for w in weights])
        assert torch.allclose(batched, loop)
    # the epoch is a tensor input: a compiled objective does not recompile as it advances
    counter = CompileCounter()
    compiled = torch.compile(lambda i: obj({}, {}, i)[0], backend=counter, fullgraph=True)
    for epoch in (0.5, 1.5, 2.5):
        compiled(make_inputs(epoch=epoch))
    assert counter.frame_count == 1


def test_a_scheduled_weight_needs_the_epoch():
    obj = build({"ce": {"weight_schedule": {"kind": "until", "epochs": 2}}})
    with pytest.raises(ValueError, match="'ce' term's weight follows a schedule"):
        obj({}, {}, make_inputs()._replace(epoch=None))


@pytest.mark.parametrize("table, message", [
    ({"kind": "warm", "epochs": 1}, "did you mean 'warmup'"),
    ({"kind": "until"}, "needs epochs"),
    ({"kind": "until", "epochs": 0}, "epochs must be > 0"),
    ({"kind": "until", "epochs": 1, "start": 0.5}, "start and end belong to the linear and cosine kinds"),
    ({"kind": "until", "epochs": 1, "length": 2}, "unknown key 'length'"),
    (3, "must be a table"),
])
def test_bad_weight_schedules_name_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        build({"ce": {"weight_schedule": table}})


# --- pre-activation features ----------------------------------------------------------------------------


def test_torchvision_preact_aliases_are_the_nodes_before_the_relu():
    model, params, buffers = build_model("resnet18", 10, 32, ("layer2", "layer2.preact", "layer2.1.add"))
    _, feats, _ = model.apply(params, buffers, torch.randn(2, 3, 32, 32), train=False)
    assert torch.equal(feats["layer2.preact"], feats["layer2.1.add"])
    assert torch.equal(torch.relu(feats["layer2.preact"]), feats["layer2"]) and (feats["layer2.preact"] < 0).any()
    cut = model.features_fn()(params, buffers, torch.randn(2, 3, 32, 32))  # the teacher's cut graph keeps it
    assert set(cut) == {"layer2", "layer2.preact", "layer2.1.add"}


def test_a_wrong_feature_name_lists_the_preact_names():
    with pytest.raises(ConfigError, match=r"layer1\.preact, layer1\.0\.preact.*layer4\.1\.preact, embedding"):
        build_model("resnet18", 10, 32, ("layer9.preact",))


def test_seed_cnn_and_wrn_preact_features():
    model, params, buffers = build_model("seed_cnn", 10, 32, ("block3", "block3_preact"))
    _, feats, _ = model.apply(params, buffers, torch.randn(2, 3, 32, 32), train=True)
    assert torch.equal(torch.relu(feats["block3_preact"]), feats["block3"]) and (feats["block3_preact"] < 0).any()
    model, params, buffers = build_model("wrn_16_2", 10, 32, ("stage1", "stage1_preact"))
    x = torch.randn(4, 3, 32, 32)
    _, feats, new_buffers = model.apply(params, buffers, x, train=True)
    bn = torch.nn.functional.batch_norm(feats["stage1"], None, None, params["block2.0.bn1.weight"],
                                        params["block2.0.bn1.bias"], training=True)
    assert torch.allclose(feats["stage1_preact"], bn, atol=1e-5)
    # the block's BatchNorm still updates its running mean once per forward, not twice
    plain = build_model("wrn_16_2", 10, 32, ())
    _, _, plain_buffers = plain[0].apply(params, buffers, x, train=True)
    assert torch.equal(new_buffers["block2.0.bn1.running_mean"], plain_buffers["block2.0.bn1.running_mean"])


# --- config --keys --------------------------------------------------------------------------------------


def test_config_keys_lists_the_new_keys():
    result = CliRunner().invoke(cli.main, ["config", "--keys"])
    assert result.exit_code == 0
    for key in ("distill.terms.ab.weight_schedule", "distill.terms.ofd.student_features",
                "distill.terms.reviewkd.teacher_features", "distill.terms.ofd.teacher_bn",
                "distill.terms.srrl.logit_weight", "distill.terms.kdsvd.k", "distill.terms.reviewkd.max_mid_channels",
                "distill.terms.ce.weight_schedule"):
        assert any(line.startswith(key + " ") for line in result.output.splitlines()), key


# --- each method config trains from the CLI on digits ----------------------------------------------------

METHODS = ("reviewkd", "fsp", "ab", "ofd", "srrl", "kdsvd")


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_methods_b")  # one teacher for every method: fitted once


@pytest.mark.parametrize("name", METHODS)
def test_method_config_trains_from_the_cli_on_digits(name, digits_root, one_thread):
    out = digits_root / f"run_{name}"
    result = CliRunner().invoke(cli.main, [
        "distill", "--config", str(ROOT / "configs" / "methods" / f"{name}.toml"), "--out", str(out), "--quiet",
        "--set", "data.train_limit=64", "--set", "data.batch_size=16", "--set", "data.eval_batch_size=400",
        "--set", "train.epochs=1", "--set", f"teacher.checkpoint={digits_root.as_posix()}/teacher.pt",
        "--set", "teacher.train.epochs=1"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    values = [r[f"train_{name}"] for r in records if f"train_{name}" in r]
    assert values and all(math.isfinite(v) for v in values) and any(v != 0 for v in values)
    state = load_checkpoint(out / "checkpoints" / "latest.pt", "student_run")["state"]
    teacher = load_checkpoint(digits_root / "teacher.pt", "teacher")["params"]
    if name == "ofd":  # margins from the fitted teacher's BatchNorms, not the preflight's random ones
        margin = state["objective"]["ofd"]["margins"]["block2_preact->layer1.preact"]
        assert torch.allclose(margin, losses.ofd_margin(teacher["layer1.1.bn2.weight"], teacher["layer1.1.bn2.bias"]))
    if name == "srrl":  # the fitted teacher's head, frozen
        assert torch.equal(state["objective"]["srrl"]["head"]["weight"], teacher["fc.weight"])


def test_a_sweep_over_a_scheduled_connected_term_vmapped_equals_the_loop(digits_root, one_thread):
    """AB's connectors (params), its `until` schedule and a grid of its weight in one sweep group: the vmapped
    step (the sweep on a GPU) gives each student the numbers of its own step."""
    runs = {}
    for how in ("loop", "vmap"):
        out = digits_root / f"sweep_{how}"
        result = CliRunner().invoke(cli.main, [
            "sweep", "--config", str(ROOT / "configs" / "methods" / "ab.toml"), "--out", str(out), "--quiet",
            "--seeds", "1", "--strategy", how, "--grid", "distill.terms.ab.weight=0.003,0.03",
            "--set", "data.train_limit=64", "--set", "data.batch_size=16", "--set", "data.eval_batch_size=400",
            "--set", "train.epochs=2", "--set", "distill.terms.ab.weight_schedule.epochs=1.0",
            "--set", f"teacher.checkpoint={digits_root.as_posix()}/teacher.pt", "--set", "teacher.train.epochs=1"])
        assert result.exit_code == 0, result.output
        assert "1 group of 2 students" in result.output
        runs[how] = {(r["student"], r["epoch"]): r for r in map(json.loads, (out / "sweep.jsonl").read_text().splitlines())}
    assert runs["loop"].keys() == runs["vmap"].keys() and len(runs["loop"]) == 4  # 2 students x 2 epochs
    # AB's indicators are discontinuous: float32 rounding that differs between a batched and a plain conv can
    # flip a few of them over eight steps, hence 5e-3 (a missing schedule or a shared weight is far off)
    for where, a in runs["loop"].items():
        b = runs["vmap"][where]
        for key in ("train_loss", "train_ab", "test_acc"):
            assert b[key] == pytest.approx(a[key], rel=5e-3, abs=1e-6), (where, key)
    first = sorted((r for (_, epoch), r in runs["loop"].items() if epoch == 1), key=lambda r: r["student"])
    assert first[0]["train_loss"] != pytest.approx(first[1]["train_loss"], rel=1e-3)  # the grid's weights counted
    for (_, epoch), r in runs["loop"].items():  # the schedule: AB weighs in during epoch 1 only
        if epoch == 2:
            assert r["train_loss"] == pytest.approx(r["train_ce"], rel=1e-6) and r["train_ab"] > 0
        else:
            assert r["train_loss"] > r["train_ce"] * (1 + 1e-4)
