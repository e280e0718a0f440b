"""Tests for the issue-20 loss terms (skd, mlkd + ce_strong, ctkd, tf_kd, pad, ickd, ft) and the two mechanisms
they brought: the strong second view (fkd.data.strong, the step's ``strong_view``) and the pre-phase
(fkd.pretrain). Each term is built from its table, equals its fkd.losses function, refuses bad values with the
dotted key, and trains a few steps from the CLI on digits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.func import vmap

from fkd import cli, losses, prng
from fkd.checkpoint import load_checkpoint
from fkd.data.strong import OPS, RANGES, apply_op, make_strong_view, rand_augment
from fkd.errors import ConfigError
from fkd.objective import build
from fkd.terms import TERMS, Shapes, TermInputs, config_fields, pair_key
from tests.conftest import tiny_config_text
from tests.test_log_sinks import _events as tensorboard_events
from tests.test_terms_methods import one_term

NEW_TERMS = ("skd", "mlkd", "ce_strong", "ctkd", "tf_kd", "pad", "ickd", "ft")
B, K = 6, 5
S_SHAPES = {"block1": (4, 8, 8), "block2": (8, 4, 4), "embedding": (8,)}
T_SHAPES = {"block1": (6, 8, 8), "block2": (12, 4, 4), "embedding": (16,)}
PAIRS = (("block1", "block1"), ("block2", "block2"))
SHAPES = Shapes(S_SHAPES, T_SHAPES, num_classes=K, num_examples=100)


def make_inputs(seed=0, epoch=1.0, hyper=None) -> TermInputs:
    g = torch.Generator().manual_seed(seed)
    s_feats = {k: torch.randn(B, *v, generator=g) for k, v in S_SHAPES.items()}
    t_feats = {k: torch.randn(B, *v, generator=g) for k, v in T_SHAPES.items()}
    return TermInputs(torch.randn(B, K, generator=g), s_feats, torch.randint(0, K, (B,), generator=g),
                      2 * torch.randn(B, K, generator=g), t_feats, torch.arange(B), torch.zeros((), dtype=torch.int64),
                      epoch=torch.tensor(float(epoch)), hyper=hyper or {},
                      student_logits_strong=torch.randn(B, K, generator=g),
                      teacher_logits_strong=2 * torch.randn(B, K, generator=g))


# --- each term computes its function ----------------------------------------------------------------

EXPECTED = {
    "skd": ({"temperature": 3.0, "tikhonov": 0.5, "instance_weight": 2.0, "direction_weight": 0.25,
             "instance_mode": "paper", "direction_mode": "code"},
            lambda i, p, s: 2.0 * losses.skd_instance(i.student_logits, i.teacher_logits, 3.0, "paper")
            + 0.25 * losses.skd_direction(i.student_logits, i.teacher_logits, 0.5, "code")),
    "mlkd": ({"temperature": 3.0}, lambda i, p, s: losses.mlkd(i.student_logits, i.teacher_logits,
                                                                i.student_logits_strong, i.teacher_logits_strong, 3.0)),
    "ce_strong": ({}, lambda i, p, s: losses.cross_entropy(i.student_logits_strong, i.labels)),
    "tf_kd": ({"temperature": 10.0, "correct_prob": 0.9},
              lambda i, p, s: losses.tf_kd_regularization(i.student_logits, i.labels, 10.0, 0.9)),
    "ctkd": ({"t_range": 10.0, "num_loops": 4.0},
             lambda i, p, s: losses.soft_target_kl(i.student_logits, i.teacher_logits, losses.ctkd_temperature(
                 p["ctkd"]["raw_temperature"], losses.ctkd_lambda(2.0, 4.0), 1.0, 10.0))),
    "pad": ({}, lambda i, p, s: losses.pad_l2(
        i.student_features["embedding"] @ p["pad"]["connector"]["weight"].T + p["pad"]["connector"]["bias"],
        i.teacher_features["embedding"], losses.variance_branch(i.student_features["embedding"], p["pad"]["variance"]),
        1e-6)),
    "ickd": ({}, lambda i, p, s: sum(losses.ickd(losses.conv_bn_embed(i.student_features[a], p["ickd"][pair_key(a, b)]),
                                                 i.teacher_features[b]) for a, b in PAIRS)),
    "ft": ({"rate": 0.5}, lambda i, p, s: sum(losses.factor_transfer(
        losses.translate(i.student_features[a], p["ft"][pair_key(a, b)]),
        losses.paraphraser_encode(i.teacher_features[b], s["ft"]["paraphraser"][pair_key(a, b)])) for a, b in PAIRS)),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_term_equals_its_function(name):
    keys, expected = EXPECTED[name]
    objective, term = one_term(name, **keys)
    for key, value in keys.items():
        assert getattr(term, key) == value
    params, state = objective.init(SHAPES)
    inputs = make_inputs(epoch=1.5)  # CTKD's lambda reads floor(epoch) + 1 = 2
    loss, metrics, _ = objective(params, state, inputs)
    want = expected(inputs, params, state)
    torch.testing.assert_close(metrics[name], want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss, 0.5 * want, rtol=1e-6, atol=1e-7)


def test_default_hyper_parameters_are_the_authors():
    defaults = {name: TERMS.get(name)() for name in ("skd", "mlkd", "ctkd", "tf_kd", "pad", "ickd", "ft")}
    skd = defaults["skd"]
    assert (skd.temperature, skd.tikhonov, skd.instance_mode, skd.direction_mode) == (4.0, 0.1, "code", "code")
    assert defaults["mlkd"].temperature == 4.0
    ctkd = defaults["ctkd"]
    assert (ctkd.t_start, ctkd.t_range, ctkd.num_loops, ctkd.lam_max, ctkd.lam_min, ctkd.init_raw) == (
        1.0, 20.0, 10.0, 1.0, 0.0, 1.0)
    assert (defaults["tf_kd"].temperature, defaults["tf_kd"].correct_prob) == (20.0, 0.99)
    assert defaults["pad"].eps == 1e-6
    ft = defaults["ft"]
    assert (ft.rate, ft.pretrain_epochs, ft.pretrain_learning_rate, ft.pretrain_weight_decay) == (0.5, 6, 0.1, 5e-4)


def test_ctkd_temperature_is_a_parameter_trained_against_the_student():
    objective, _ = one_term("ctkd")
    params, state = objective.init(SHAPES)
    assert params["ctkd"]["raw_temperature"].item() == 1.0
    assert state["ctkd"]["temperature"].item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)
    inputs = make_inputs(epoch=20.0)  # lambda = 1: the full reversal
    grads = torch.func.grad(lambda p: objective(p, state, inputs)[0])(params)
    raw = params["ctkd"]["raw_temperature"].clone().requires_grad_()
    t = losses.ctkd_temperature(raw, -1.0)  # lam = -1: no reversal, the true gradient
    (0.5 * losses.soft_target_kl(inputs.student_logits, inputs.teacher_logits, t)).backward()
    torch.testing.assert_close(grads["ctkd"]["raw_temperature"], -raw.grad)
    _, _, new_state = objective(params, state, inputs)
    assert new_state["ctkd"]["temperature"].shape == ()


def test_pad_has_no_connector_for_equal_widths_and_trains_its_variance():
    equal = Shapes({"embedding": (16,)}, {"embedding": (16,)}, num_classes=K)
    objective, _ = one_term("pad")
    params, _ = objective.init(equal)
    assert set(params["pad"]) == {"variance"} and params["pad"]["variance"]["weight"].shape == (16, 16)
    params, _ = objective.init(SHAPES)
    assert params["pad"]["connector"]["weight"].shape == (16, 8)
    grads = torch.func.grad(lambda p: objective(p, {}, make_inputs())[0])(params)
    assert all(g.abs().sum() > 0 for g in grads["pad"]["variance"].values())


def test_ft_keeps_its_paraphraser_in_the_state_and_trains_the_translator():
    objective, _ = one_term("ft")
    params, state = objective.init(SHAPES, seed=1)
    key = pair_key("block2", "block2")
    assert params["ft"][key]["conv1"]["weight"].shape == (6, 8, 3, 3)  # C_s = 8 -> F = round(12 * 0.5)
    assert state["ft"]["paraphraser"][key]["deconv1"]["weight"].shape == (6, 12, 3, 3)
    grads = torch.func.grad(lambda p: objective(p, state, make_inputs())[0])(params)
    assert grads["ft"][key]["conv0"]["weight"].abs().sum() > 0


@pytest.mark.parametrize("name, key, value", [
    ("skd", "temperature", 0.0), ("skd", "instance_mode", "both"), ("skd", "direction_weight", -1.0),
    ("mlkd", "temperature", -1.0), ("ctkd", "t_range", 0.0), ("ctkd", "lam_max", -0.5), ("tf_kd", "correct_prob", 1.0),
    ("pad", "eps", 0.0), ("ft", "rate", 0.0), ("ft", "pretrain_epochs", -1), ("ft", "pretrain_epochs", 1.5),
])
def test_bad_value_fails_naming_the_key(name, key, value):
    with pytest.raises(ConfigError, match=rf"distill\.terms\.{name}\.{key}"):
        build({name: {key: value}}, pairs=PAIRS, where="distill.terms")


def test_feature_terms_check_their_pairs():
    with pytest.raises(ConfigError, match="equal size"):
        build({"ickd": {}}, pairs=(("block2", "block1"),)).check(SHAPES)
    with pytest.raises(ConfigError, match="ft needs spatial maps"):
        build({"ft": {}}, pairs=(("embedding", "embedding"),)).check(SHAPES)
    with pytest.raises(ConfigError, match="lam_min"):
        build({"ctkd": {"lam_min": 0.8, "lam_max": 0.5}}).check(SHAPES)
    with pytest.raises(ConfigError, match="one teacher only"):
        build({"mlkd": {}}, teachers={"a": 1.0, "b": 1.0})


def test_strong_view_inputs_are_declared_and_checked():
    objective, _ = one_term("mlkd")
    assert objective.needs_strong_view and objective.needs_teacher
    assert not build({"ce": {}, "logit": {}}).needs_strong_view
    assert build({"ce_strong": {}}).needs_strong_view and not build({"ce_strong": {}}).needs_teacher
    with pytest.raises(ValueError, match="'mlkd' term consumes student_logits_strong"):
        objective({}, {}, make_inputs()._replace(student_logits_strong=None))


@pytest.mark.parametrize("name, field", [("skd", "tikhonov"), ("mlkd", "temperature"), ("tf_kd", "temperature")])
def test_sweepable_fields_come_from_the_step_and_vmap(name, field):
    objective, term = one_term(name)
    assert field in term.sweepable
    inputs = make_inputs()
    values = torch.tensor([0.5, 1.0, 2.0])

    def loss(v):
        return objective({}, {}, inputs, hyper={name: {"weight": torch.tensor(1.0), field: v}})[0]

    looped = [one_term(name, **{field: float(v)})[1].apply({}, {}, inputs)[0] for v in values]
    torch.testing.assert_close(vmap(loss)(values), torch.stack(looped), rtol=1e-5, atol=1e-6)


def test_config_keys_lists_every_new_key():
    result = CliRunner().invoke(cli.main, ["config", "--keys"])
    assert result.exit_code == 0, result.output
    for name in NEW_TERMS:
        assert f"distill.terms.{name}.weight" in result.output
        for f in config_fields(TERMS.get(name)):
            line = next(ln for ln in result.output.splitlines() if ln.startswith(f"distill.terms.{name}.{f.name} "))
            assert f.metadata["help"].split(" (")[0] in line


# --- the strong view ------------------------------------------------------------------------------------


def test_strong_view_is_a_pure_function_of_the_key():
    x = torch.rand(8, 3, 12, 12)
    strong = make_strong_view("cifar100")
    key = prng.key_from_seed(3)
    a, b = strong(x, key), strong(x, key)
    assert a.shape == x.shape and torch.equal(a, b) and torch.isfinite(a).all()
    assert not torch.equal(a, strong(x, prng.fold_in(key, 1)))
    assert torch.equal(x, x.clone())  # the input is untouched
    # vmap over keys (a sweep's students) equals a loop
    keys = torch.stack([prng.key_from_seed(s) for s in range(3)])
    torch.testing.assert_close(vmap(strong, in_dims=(None, 0))(x, keys), torch.stack([strong(x, k) for k in keys]))


def test_strong_view_operations():
    x = torch.rand(4, 3, 8, 8)
    for op in OPS:
        lo, hi = RANGES.get(op, (0.0, 1.0))
        out = apply_op(x, op, torch.full((4,), (lo + hi) / 2))
        assert out.shape == x.shape and out.min() >= -1e-6 and out.max() <= 1 + 1e-6, op
    torch.testing.assert_close(apply_op(x, "brightness", torch.full((4,), 0.5)), x * 0.5)
    torch.testing.assert_close(apply_op(x, "rotate", torch.zeros(4)), x)
    torch.testing.assert_close(apply_op(x, "solarize", torch.zeros(4)), 1 - x)
    shifted = apply_op(x, "translate_x", torch.full((4,), 0.25))  # a quarter of 8 px: two columns
    torch.testing.assert_close(shifted[..., :6], x[..., 2:])
    # Each image draws its own operations: one batch, different ops per image.
    out = rand_augment(x, prng.key_from_seed(0))
    assert len({float((out[i] - x[i]).abs().sum()) for i in range(4)}) == 4


def test_the_step_runs_student_and_teacher_on_the_strong_view():
    """One step of ce + mlkd + ce_strong: the weak view's teacher logits from a cache give the same step as the
    teacher live (the strong view's teacher always runs live), and the step refuses to be built without a
    strong view."""
    from fkd import optim
    from fkd.models import build_model
    from fkd.step import init_train_state, make_train_step

    student, sp, sb = build_model("small_cnn", 10, 16, (), widths=(4, 8))
    teacher, tp, tb = build_model("small_cnn", 10, 16, (), widths=(8, 16), seed=1)
    objective = build({"ce": {}, "mlkd": {"weight": 0.5}, "ce_strong": {}})
    opt = optim.sgd(0.1)
    with pytest.raises(ValueError, match="strong_view"):
        make_train_step(student, objective, opt, teacher=teacher, compile="off")
    strong = make_strong_view("none")
    step = make_train_step(student, objective, opt, teacher=teacher, compile="off", strong_view=strong)
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.rand(4, 3, 16, 16, generator=g), "y": torch.randint(0, 10, (4,), generator=g)}
    tvars = {"params": tp, "buffers": tb}
    state = init_train_state(sp, sb, opt, seed=3)
    live_state, live = step(state, batch, tvars)
    with torch.no_grad():
        cached_logits = teacher.apply(tp, tb, batch["x"], train=False)[0]
    cached_state, cached = step(state, {**batch, "teacher_logits": cached_logits}, tvars)
    for k in ("loss", "ce", "mlkd", "ce_strong"):
        torch.testing.assert_close(cached[k], live[k])
    assert bool(live["finite"]) and live["ce_strong"] != live["ce"]  # two different views
    # BatchNorm statistics saw both views: two updates of the running mean
    assert int(live_state["buffers"][next(k for k in sb if k.endswith("num_batches_tracked"))]) == 2
    with pytest.raises(ValueError, match="teacher live"):
        step(state, {**batch, "teacher_logits": cached_logits})


# --- end to end from the CLI on digits -------------------------------------------------------------------


def digits_config(root: Path, terms: str, **distill) -> str:
    return tiny_config_text(
        root, "terms", dataset="digits", name="methods_a", extra=f"[distill.terms.ce]\nweight = 1.0\n{terms}",
        data={"image_size": 8, "train_limit": 48, "eval_batch_size": 400},
        teacher={"checkpoint": f"{root.as_posix()}/teacher.pt", "train": {"epochs": 1, "log_every": None}},
        train={"epochs": 1, "log_every": None},
        distill={"student_features": ["block1", "block2"], "teacher_features": ["block1", "block2"], **distill})


CLI_TABLES = {
    "skd": "[distill.terms.skd]\nweight = 1.0\n",
    "mlkd": "[distill.terms.mlkd]\nweight = 0.5\n[distill.terms.ce_strong]\nweight = 1.0\n",
    "ctkd": "[distill.terms.ctkd]\nweight = 1.0\nnum_loops = 1.0\n",
    "tf_kd": "[distill.terms.tf_kd]\nweight = 10.0\n",
    "pad": "[distill.terms.pad]\nweight = 1.0\n",
    "ickd": "[distill.terms.ickd]\nweight = 2.5\n",
    "ft": "[distill.terms.ft]\nweight = 50.0\npretrain_epochs = 1\n",
}


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_methods_a")  # one teacher for every term: fitted once


def run_cli(args):
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("name", CLI_TABLES)
def test_term_trains_from_the_cli_on_digits(name, digits_root, one_thread):
    cfg = digits_root / f"{name}.toml"
    cfg.write_text(digits_config(digits_root, CLI_TABLES[name]))
    out = digits_root / f"run_{name}"
    result = run_cli(["distill", "--config", str(cfg), "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert name in summary["terms"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    values = [r[f"train_{name}"] for r in records if f"train_{name}" in r]
    assert values and all(math.isfinite(v) for v in values) and any(v != 0 for v in values)
    state = load_checkpoint(out / "checkpoints" / "latest.pt", "student_run")["state"]
    if name == "mlkd":  # the weak view's teacher outputs cached, the strong view's computed live in the step
        assert "teacher cache: memory" in result.output
        assert all(math.isfinite(r["train_ce_strong"]) for r in records if "train_ce_strong" in r)
    if name == "ctkd":  # the raw temperature trained (with the reversed gradient) and was checkpointed
        assert state["params"]["objective"]["ctkd"]["raw_temperature"].item() != 1.0
    if name == "ft":  # the pre-phase ran first (one line per epoch) and fitted the paraphraser, kept in the state
        assert "ft pre-phase epoch 1/1: paraphraser loss" in result.output
        para = state["objective"]["ft"]["paraphraser"]["block2->block2"]
        assert set(para) == {"conv0", "conv1", "conv2", "deconv0", "deconv1", "deconv2"}


def test_ft_pre_phase_fits_the_paraphraser_then_the_student_leaves_it_alone(digits_root, one_thread, monkeypatch):
    """The paraphraser after the run equals the pre-phase's result (the student's steps never change it), and
    the pre-phase lowers its reconstruction loss."""
    import fkd.distill as distill_module
    from fkd import pretrain

    seen = {}

    def spy(objective, state, **kwargs):
        seen["before"] = state["objective"]["ft"]["paraphraser"]
        new = pretrain.pretrain_terms(objective, state, **kwargs)
        seen["after"] = new["objective"]["ft"]["paraphraser"]
        seen["count"] = seen.get("count", 0) + 1
        return new

    monkeypatch.setattr(distill_module, "pretrain_terms", spy)
    cfg = digits_root / "ft_pre.toml"
    cfg.write_text(digits_config(digits_root, "[distill.terms.ft]\nweight = 50.0\npretrain_epochs = 3\n"
                                 "pretrain_learning_rate = 0.05\n").replace("epochs = 1\nlog_every", "epochs = 2\nlog_every"))
    out = digits_root / "run_ft_pre"
    result = run_cli(["distill", "--config", str(cfg), "--out", str(out), "--set", "log.tensorboard=true"])
    losses_by_epoch = [float(line.rsplit(" ", 1)[1]) for line in result.output.splitlines() if "ft pre-phase" in line]
    assert len(losses_by_epoch) == 3 and losses_by_epoch[-1] < losses_by_epoch[0]
    # the same losses on TensorBoard, one point per pre-phase epoch
    events = tensorboard_events(out / "tensorboard")
    logged = events.Scalars("pretrain/ft.paraphraser")
    assert [e.step for e in logged] == [1, 2, 3]
    assert [e.value for e in logged] == pytest.approx(losses_by_epoch, rel=1e-3)
    state = load_checkpoint(out / "checkpoints" / "latest.pt", "student_run")["state"]
    saved = state["objective"]["ft"]["paraphraser"]
    for pair in saved:
        for layer in saved[pair]:
            assert not torch.equal(seen["before"][pair][layer]["weight"], seen["after"][pair][layer]["weight"])
            torch.testing.assert_close(saved[pair][layer]["weight"], seen["after"][pair][layer]["weight"].cpu())
    assert seen["count"] == 1


def test_a_sweep_logs_each_students_pre_phase(digits_root, one_thread):
    cfg = digits_root / "ft_sweep.toml"
    cfg.write_text(digits_config(digits_root, "[distill.terms.ft]\nweight = 50.0\npretrain_epochs = 2\n"))
    out = digits_root / "sweep_ft"
    run_cli(["sweep", "--config", str(cfg), "--out", str(out), "--seeds", "2", "--quiet",
             "--set", "log.tensorboard=true"])
    for seed in (0, 1):
        logged = tensorboard_events(out / "tensorboard" / f"base__seed={seed}").Scalars("pretrain/ft.paraphraser")
        assert [e.step for e in logged] == [1, 2] and all(math.isfinite(e.value) for e in logged)


def test_a_resumed_ft_run_skips_the_pre_phase(digits_root, one_thread, monkeypatch):
    """The pre-phase's result is in the checkpointed state: a run resumed for a second epoch does not repeat it
    and keeps the paraphraser it had."""
    import fkd.distill as distill_module

    calls = []
    real = distill_module.pretrain_terms
    monkeypatch.setattr(distill_module, "pretrain_terms", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = digits_root / "ft_resume.toml"
    cfg.write_text(digits_config(digits_root, "[distill.terms.ft]\nweight = 50.0\npretrain_epochs = 1\n"))
    out = digits_root / "run_ft_resume"
    run_cli(["distill", "--config", str(cfg), "--out", str(out), "--quiet"])
    assert calls == [1]
    first = load_checkpoint(out / "checkpoints" / "latest.pt", "student_run")
    run_cli(["distill", "--config", str(cfg), "--out", str(out), "--quiet", "--resume", "--set", "train.epochs=2"])
    assert calls == [1]  # not again
    second = load_checkpoint(out / "checkpoints" / "latest.pt", "student_run")
    assert (first["epoch"], second["epoch"]) == (1, 2)
    weight = next(iter(first["state"]["params"]["model"]))
    assert not torch.equal(first["state"]["params"]["model"][weight], second["state"]["params"]["model"][weight])
    a, b = first["state"]["objective"]["ft"]["paraphraser"], second["state"]["objective"]["ft"]["paraphraser"]
    assert all(torch.equal(a[p][m]["weight"], b[p][m]["weight"]) for p in a for m in a[p])


def test_mlkd_sweep_vmapped_equals_the_loop(digits_root, one_thread, monkeypatch):
    """The strong view and its teacher run inside a vmapped population step exactly as one step per student, and
    a sweep runs FT's pre-phase for each student as distill does."""
    import fkd.sweep.runner as runner

    pre_phases = []
    real = runner.pretrain_terms
    monkeypatch.setattr(runner, "pretrain_terms", lambda *a, **k: pre_phases.append(1) or real(*a, **k))
    cfg = digits_root / "mlkd_sweep.toml"
    cfg.write_text(digits_config(digits_root, CLI_TABLES["mlkd"] + CLI_TABLES["skd"] + CLI_TABLES["ft"]))
    runs = {}
    for how in ("loop", "vmap"):
        out = digits_root / f"sweep_mlkd_{how}"
        result = run_cli(["sweep", "--config", str(cfg), "--out", str(out), "--quiet", "--seeds", "1",
                          "--strategy", how, "--grid", "distill.terms.mlkd.temperature=2,4"])
        assert "1 group of 2 students" in result.output
        runs[how] = {r["student"]: r for r in map(json.loads, (out / "sweep.jsonl").read_text().splitlines())}
    assert runs["loop"].keys() == runs["vmap"].keys() and len(runs["loop"]) == 2
    for student, a in runs["loop"].items():
        for name in ("loss", "mlkd", "ce_strong", "skd", "ft"):
            assert runs["vmap"][student][f"train_{name}"] == pytest.approx(a[f"train_{name}"], rel=1e-4, abs=1e-6)
    assert len(pre_phases) == 4  # two students, two strategies


class _Source:
    """A stand-in training source: the same 3 batches of random images every epoch (``batches`` as fkd's)."""

    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.data = [(torch.rand(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g), torch.arange(4))
                     for _ in range(3)]

    def batches(self, batch_size, *, shuffle, epoch=0, seed=0, augment=False, **kwargs):
        return iter(self.data)


def test_pretrain_terms_fits_only_the_declared_part_of_the_state():
    from fkd import optim
    from fkd.models import build_model
    from fkd.pretrain import pretrain_terms, pretraining_terms
    from fkd.step import init_train_state

    student, sp, sb = build_model("small_cnn", 10, 16, ("block2",), widths=(4, 8))
    teacher, tp, tb = build_model("small_cnn", 10, 16, ("block2",), widths=(8, 16), seed=1)
    objective = build({"ce": {}, "ft": {"pretrain_epochs": 4, "pretrain_learning_rate": 0.05}},
                      pairs=(("block2", "block2"),))
    assert [t.name for t in pretraining_terms(objective)] == ["ft"]
    assert not pretraining_terms(build({"ft": {"pretrain_epochs": 0}}, pairs=(("block2", "block2"),)))
    shapes = Shapes({"block2": (8, 4, 4)}, {"block2": (16, 4, 4)}, num_classes=10)
    o_params, o_state = objective.init(shapes)
    state = init_train_state(sp, sb, optim.sgd(0.1), objective_params=o_params, objective_state=o_state)
    lines = []
    new = pretrain_terms(objective, state, teacher=teacher, teacher_vars={"params": tp, "buffers": tb},
                         source=_Source(), batch_size=4, seed=0, augment=False, echo=lines.append)
    assert len(lines) == 4
    first, last = (float(line.rsplit(" ", 1)[1]) for line in (lines[0], lines[-1]))
    assert last < first  # the reconstruction improved
    before, after = state["objective"]["ft"]["paraphraser"], new["objective"]["ft"]["paraphraser"]
    assert all(not torch.equal(before[p][m]["weight"], after[p][m]["weight"]) for p in before for m in before[p])
    assert new["params"] is state["params"] and new["opt_state"] is state["opt_state"]  # the rest untouched
    assert state["objective"]["ft"]["paraphraser"] is before  # the input state is not modified
    with pytest.raises(ConfigError, match="moving-average teacher"):
        pretrain_terms(objective, state, teacher=teacher, teacher_vars=None, source=_Source(), batch_size=4, seed=0,
                       augment=False)
