"""Tests for the issue-9 loss terms (dkd, dist, lskd, sp, rkd, pkt, cc, nst, vid): built from
``[distill.terms.<name>]`` tables, wired to their fkd.losses function, bad tables refused with the dotted
key, ``config --keys`` lists every key, and each trains a few steps from the CLI on digits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch.func import vmap

from fkd import cli, losses
from fkd.checkpoint import load_checkpoint
from fkd.errors import ConfigError
from fkd.objective import build
from fkd.terms import TERMS, Shapes, TermInputs, config_fields, pair_key
from tests.conftest import tiny_config_text

NEW_TERMS = ("dkd", "dist", "lskd", "sp", "rkd", "pkt", "cc", "nst", "vid")
B, K = 6, 5
S_SHAPES = {"block1": (4, 8, 8), "block2": (8, 4, 4), "embedding": (8,)}
T_SHAPES = {"block1": (6, 8, 8), "block2": (12, 2, 2), "embedding": (16,)}
PAIRS = (("block1", "block1"), ("block2", "block2"))
SHAPES = Shapes(S_SHAPES, T_SHAPES, num_classes=K, num_examples=100)


def make_inputs(seed=0, labels=None, epoch=1.0, hyper=None) -> TermInputs:
    g = torch.Generator().manual_seed(seed)
    s_feats = {k: torch.randn(B, *v, generator=g) for k, v in S_SHAPES.items()}
    t_feats = {k: torch.randn(B, *v, generator=g) for k, v in T_SHAPES.items()}
    y = torch.randint(0, K, (B,), generator=g) if labels is None else labels
    return TermInputs(torch.randn(B, K, generator=g), s_feats, y, 2 * torch.randn(B, K, generator=g), t_feats,
                      torch.arange(B), torch.zeros((), dtype=torch.int64), epoch=torch.tensor(float(epoch)),
                      hyper=hyper or {})


def one_term(name, **keys):
    objective = build({name: {"weight": 0.5, **keys}}, pairs=PAIRS)
    (weighted,) = objective.terms
    assert weighted.name == name and weighted.weight == 0.5
    return objective, weighted.term


# --- each term computes its function ----------------------------------------------------------------

#: name -> (table keys, expected loss from fkd.losses called directly)
EXPECTED = {
    "dkd": ({"alpha": 2.0, "beta": 4.0, "temperature": 3.0},
            lambda i: losses.dkd(i.student_logits, i.teacher_logits, i.labels, 2.0, 4.0, 3.0)),
    "dist": ({"beta": 2.0, "gamma": 0.5, "temperature": 4.0},
             lambda i: losses.dist(i.student_logits, i.teacher_logits, 2.0, 0.5, 4.0)),
    "lskd": ({"temperature": 3.0}, lambda i: losses.logit_standardized_kd(i.student_logits, i.teacher_logits, 3.0)),
    "sp": ({}, lambda i: losses.similarity_preserving(i.student_features["embedding"],
                                                      i.teacher_features["embedding"])),
    "rkd": ({"distance_weight": 1.0, "angle_weight": 2.0, "student_feature": "block2"},
            lambda i: losses.rkd(i.student_features["block2"].flatten(1), i.teacher_features["embedding"], 1.0, 2.0)),
    "pkt": ({"eps": 1e-6}, lambda i: losses.pkt(i.student_features["embedding"], i.teacher_features["embedding"],
                                                1e-6)),
    "cc": ({"gamma": 0.3, "order": 3, "teacher_feature": "block1"},
           lambda i: losses.correlation_congruence(i.student_features["embedding"], i.teacher_features["block1"],
                                                   0.3, 3)),
    "nst": ({}, lambda i: sum(losses.nst(i.student_features[s], i.teacher_features[t]) for s, t in PAIRS)),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_term_equals_its_function(name):
    keys, expected = EXPECTED[name]
    objective, term = one_term(name, **keys)
    for key, value in keys.items():
        assert getattr(term, key) == value
    params, state = objective.init(SHAPES)
    inputs = make_inputs()
    loss, metrics, new_state = objective(params, state, inputs)
    assert torch.allclose(metrics[name], expected(inputs), rtol=1e-6)
    assert torch.allclose(loss, 0.5 * expected(inputs), rtol=1e-6)


def test_vid_term_params_and_value():
    objective, term = one_term("vid", init_variance=3.0)
    params, state = objective.init(SHAPES, seed=3)
    mine = params["vid"]
    assert set(mine) == {pair_key(s, t) for s, t in PAIRS} and state == {"vid": {}}
    p1 = mine[pair_key("block1", "block1")]
    assert p1["w1"].shape == (6, 4) and p1["w3"].shape == (6, 6) and p1["log_scale"].shape == (6,)
    assert torch.allclose(torch.nn.functional.softplus(p1["log_scale"]) + 1e-5, torch.full((6,), 3.0))
    again, _ = objective.init(SHAPES, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(mine[pair_key("block2", "block2")].values(),
                                                  again["vid"][pair_key("block2", "block2")].values()))
    inputs = make_inputs()
    expected = 0.0
    for s, t in PAIRS:
        p = mine[pair_key(s, t)]
        f_s = inputs.student_features[s]
        if s == "block2":  # the student's 4x4 map is pooled to the teacher's 2x2 first
            f_s = torch.nn.functional.avg_pool2d(f_s, 2)
        mean = torch.einsum("oc,bchw->bohw", p["w3"], torch.relu(torch.einsum(
            "oc,bchw->bohw", p["w2"], torch.relu(torch.einsum("oc,bchw->bohw", p["w1"], f_s)))))
        var = torch.nn.functional.softplus(p["log_scale"])[:, None, None] + 1e-5
        expected = expected + (0.5 * ((mean - inputs.teacher_features[t]) ** 2 / var + var.log())).mean()
    _, metrics, _ = objective(params, state, inputs)
    assert torch.allclose(metrics["vid"], expected, rtol=1e-5)
    # Its parameters get gradients (they train with the student).
    grads = torch.func.grad(lambda p: objective(p, state, inputs)[0])(params)
    assert all(g.abs().sum() > 0 for g in grads["vid"][pair_key("block1", "block1")].values())


def test_dkd_warmup_scales_by_the_epoch_and_leaves_out_unlabeled_examples():
    objective, _ = one_term("dkd", warmup_epochs=4.0)
    labels = torch.tensor([0, -1, 2, 3, -1, 1])
    full = losses.dkd(*(lambda i: (i.student_logits, i.teacher_logits))(make_inputs(labels=labels)), labels)
    for epoch, scale in [(0.0, 0.0), (1.0, 0.25), (3.0, 0.75), (4.0, 1.0), (9.5, 1.0)]:
        # the warm-up scales the term's weight (0.5) in the loss; the metric is the unweighted DKD
        loss, metrics, _ = objective({}, {}, make_inputs(labels=labels, epoch=epoch))
        assert loss.item() == pytest.approx(0.5 * scale * full.item(), rel=1e-6, abs=1e-9)
        assert metrics["dkd"].item() == pytest.approx(full.item(), rel=1e-6)
    keep = labels >= 0
    i = make_inputs(labels=labels)
    assert full.item() == pytest.approx(
        losses.dkd(i.student_logits[keep], i.teacher_logits[keep], labels[keep]).item(), rel=1e-6)


def test_dkd_needs_the_epoch():
    objective, _ = one_term("dkd", warmup_epochs=2.0)  # its warm-up is a weight schedule over the epochs
    with pytest.raises(ValueError, match="'dkd' term's weight follows a schedule"):
        objective({}, {}, make_inputs()._replace(epoch=None))


@pytest.mark.parametrize("name, field", [("dkd", "beta"), ("dist", "temperature"), ("lskd", "temperature"),
                                         ("rkd", "angle_weight"), ("cc", "gamma")])
def test_sweepable_fields_come_from_the_step_and_vmap(name, field):
    """A sweep passes per-student values as 0-d tensors (``inputs.hyper``); vmapped they equal a loop."""
    objective, term = one_term(name)
    assert field in term.sweepable
    inputs = make_inputs()
    values = torch.tensor([0.5, 1.0, 2.0])

    def loss(v):
        return objective({}, {}, inputs, hyper={name: {"weight": torch.tensor(1.0), field: v}})[0]

    looped = []
    for v in values:
        _, direct = one_term(name, **{field: float(v)})
        looped.append(direct.apply({}, {}, inputs)[0])
    assert torch.allclose(vmap(loss)(values), torch.stack(looped), rtol=1e-5)


# --- config tables and checks --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW_TERMS)
def test_unknown_key_fails_naming_it(name):
    with pytest.raises(ConfigError, match=rf"unknown key 'bogus' in distill\.terms\.{name}"):
        build({name: {"bogus": 1}}, pairs=PAIRS, where="distill.terms")


@pytest.mark.parametrize("name, key, value", [
    ("dkd", "temperature", 0.0), ("dkd", "beta", -1.0), ("dkd", "warmup_epochs", -2.0), ("dist", "gamma", -1.0),
    ("lskd", "temperature", -1.0), ("sp", "student_feature", ""), ("rkd", "distance_weight", -1.0),
    ("pkt", "eps", 0.0), ("cc", "order", -1), ("cc", "order", 1.5), ("cc", "gamma", 0.0),
    ("vid", "init_variance", 0.0), ("vid", "eps", -1.0), ("nst", "weight", -1.0),
])
def test_bad_value_fails_naming_the_key(name, key, value):
    with pytest.raises(ConfigError, match=rf"distill\.terms\.{name}\.{key}"):
        build({name: {key: value}}, pairs=PAIRS, where="distill.terms")


def test_map_terms_check_their_pairs():
    vectors = Shapes({"v": (8,)}, {"v": (16,)}, num_classes=K)
    objective = build({"nst": {}}, pairs=(("v", "v"),))
    with pytest.raises(ConfigError, match="nst needs spatial maps"):
        objective.check(vectors)
    with pytest.raises(ConfigError, match="student_features"):
        build({"vid": {}}, pairs=()).check(SHAPES)
    with pytest.raises(ConfigError, match="init_variance"):
        build({"vid": {"init_variance": 1e-6}}, pairs=PAIRS).check(SHAPES)
    # VID also pairs vectors (its regressor is then a stack of linear maps).
    params, _ = build({"vid": {}}, pairs=(("v", "v"),)).init(vectors)
    assert params["vid"]["v->v"]["w1"].shape == (16, 8)


def test_embedding_terms_read_their_one_pair():
    objective = build({"sp": {"student_feature": "block2", "teacher_feature": "embedding"}, "nst": {}}, pairs=PAIRS)
    assert objective.student_feature_names == ("block2", "block1")
    assert objective.teacher_feature_names == ("embedding", "block1", "block2")


def test_config_keys_lists_every_new_key():
    result = CliRunner().invoke(cli.main, ["config", "--keys"])
    assert result.exit_code == 0, result.output
    for name in NEW_TERMS:
        assert f"distill.terms.{name}.weight" in result.output
        for f in config_fields(TERMS.get(name)):
            line = next(ln for ln in result.output.splitlines() if ln.startswith(f"distill.terms.{name}.{f.name} "))
            assert f.metadata["help"].split(" (")[0] in line


# --- end to end from the CLI on digits -------------------------------------------------------------------


def digits_config(root: Path, name: str, weight: float, keys: str) -> str:
    """One epoch on 48 digits at 8 px: CE plus the term ``name`` (its ``weight`` and extra TOML ``keys``)
    on two feature pairs."""
    return tiny_config_text(
        root, "terms", dataset="digits", name="methods",
        extra=f"[distill.terms.ce]\nweight = 1.0\n[distill.terms.{name}]\nweight = {weight}\n{keys}",
        data={"image_size": 8, "train_limit": 48, "eval_batch_size": 400},
        teacher={"checkpoint": f"{root.as_posix()}/teacher.pt", "train": {"epochs": 1, "log_every": None}},
        train={"epochs": 1, "log_every": None},
        distill={"student_features": ["block1", "block2"], "teacher_features": ["block1", "block2"]})


#: The term's table for the CLI run (weights of the order the methods' papers use, scaled for digits).
CLI_TABLES = {
    "dkd": (1.0, "warmup_epochs = 0.5"), "dist": (2.0, "temperature = 4.0"), "lskd": (9.0, ""),
    "sp": (100.0, 'student_feature = "block2"\nteacher_feature = "block2"'), "rkd": (1.0, ""),
    "pkt": (1000.0, ""), "cc": (0.5, ""), "nst": (10.0, ""), "vid": (0.5, ""),
    "crd": (0.1, "nce_k = 32\nfeat_dim = 16"),
}


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_methods")  # one teacher for every term: fitted once


@pytest.mark.parametrize("name", (*NEW_TERMS, "crd"))
def test_term_trains_from_the_cli_on_digits(name, digits_root, one_thread):
    weight, keys = CLI_TABLES[name]
    cfg = digits_root / f"{name}.toml"
    cfg.write_text(digits_config(digits_root, name, weight, keys))
    out = digits_root / f"run_{name}"
    result = CliRunner().invoke(cli.main, ["distill", "--config", str(cfg), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["terms"] == {"ce": 1.0, name: weight}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    values = [r[f"train_{name}"] for r in records if f"train_{name}" in r]
    assert values and all(math.isfinite(v) for v in values)
    assert any(v != 0 for v in values)
    if name == "vid":  # its regressors and log-scales trained with the student and were checkpointed
        state = load_checkpoint(out / "checkpoints" / "latest.pt", "student_run")["state"]
        log_scale = state["params"]["objective"]["vid"]["block1->block1"]["log_scale"]
        assert not torch.allclose(log_scale, torch.full_like(log_scale, math.log(math.expm1(5.0 - 1e-5))))
    if name == "crd":  # its memory banks (one row per training image) and normalisers are checkpointed
        state = load_checkpoint(out / "checkpoints" / "latest.pt", "student_run")["state"]
        bank = state["objective"]["crd"]
        assert bank["memory_student"].shape == (48, 16) and bank["memory_teacher"].shape == (48, 16)
        assert torch.allclose(bank["memory_student"].norm(dim=1), torch.ones(48))  # every row was updated
        assert bank["z_student"] > 0 and bank["z_teacher"] > 0


ALL_TABLES = "\n".join(f"[distill.terms.{name}]\nweight = {w}\n{keys}\n" for name, (w, keys) in CLI_TABLES.items()
                       if name not in ("dkd", "crd"))


def test_all_terms_in_one_sweep_vmapped_equal_the_loop(digits_root, one_thread):
    """Every new term in one objective, students differing in sweepable fields: the vmapped step (the
    sweep on a GPU) gives the same losses as one step per student."""
    cfg = digits_root / "all.toml"
    cfg.write_text(digits_config(digits_root, "dkd", 1.0, "warmup_epochs = 0.5")
                   + ALL_TABLES)
    runs = {}
    for how in ("loop", "vmap"):
        out = digits_root / f"sweep_{how}"
        result = CliRunner().invoke(cli.main, ["sweep", "--config", str(cfg), "--out", str(out), "--quiet",
                                               "--seeds", "1", "--strategy", how,
                                               "--grid", "distill.terms.dkd.beta=4,8",
                                               "--grid", "distill.terms.rkd.angle_weight=25,50"])
        assert result.exit_code == 0, result.output
        assert "1 group of 4 students" in result.output
        runs[how] = {r["student"]: r for r in map(json.loads, (out / "sweep.jsonl").read_text().splitlines())}
    assert runs["loop"].keys() == runs["vmap"].keys() and len(runs["loop"]) == 4
    for student, a in runs["loop"].items():
        b = runs["vmap"][student]
        for name in ("loss", *NEW_TERMS):
            assert b[f"train_{name}"] == pytest.approx(a[f"train_{name}"], rel=1e-4, abs=1e-6), (student, name)
