"""Beyond one student and one frozen teacher: a mean (EMA) teacher, several teachers, cohorts -- from the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from fkd.checkpoint import load_checkpoint
from tests.test_cli import _final_params, _interrupt_after, invoke

EMA = {"source": "ema", "decay": 0.9, "arch": "resnet18", "fit_if_missing": False}


def _state(run):
    return load_checkpoint(run / "checkpoints" / "latest.pt", "student_run")["state"]


def test_ema_teacher_trains_without_a_checkpoint_and_keeps_the_average(tiny_config, tmp_path):
    cfg = tiny_config("logit", teacher=EMA)
    out = tmp_path / "run"
    result = invoke("distill", "--config", cfg, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "teacher").exists()  # no teacher was fitted or read
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_source"] == "ema" and 0 <= summary["teacher_test_acc"] <= 1
    state = _state(out)
    ema, model = state["ema"]["params"], state["params"]["model"]
    assert set(ema) == set(model)
    # the average lags the weights: equal to neither the final nor the initial student
    assert any(not torch.equal(ema[k], model[k]) for k in model)


def test_ema_step_moves_the_average_by_its_formula():
    from fkd.models import build_model
    from fkd.objective import from_weights
    from fkd.optim import sgd
    from fkd.step import init_train_state, make_train_step

    model, params, buffers = build_model("small_cnn", 4, 16, (), seed=0, widths=[4, 8])
    opt = sgd(0.1)
    state = init_train_state(params, buffers, opt, ema=True)
    step = make_train_step(model, from_weights({"ce": 0.5, "logit": 0.5}), opt, teacher=model, ema_decay=0.75)
    batch = {"x": torch.randn(8, 3, 16, 16), "y": torch.randint(0, 4, (8,))}
    new, _ = step(state, batch)
    for k in params:
        want = 0.75 * state["ema"]["params"][k] + 0.25 * new["params"]["model"][k]
        assert torch.allclose(new["ema"]["params"][k], want, atol=1e-6), k
    assert torch.equal(state["ema"]["params"][next(iter(params))], params[next(iter(params))])  # untouched


def _full_and_resumed(cfg, tmp_path, monkeypatch):
    """Run ``cfg`` whole into ``full`` and interrupted after 8 steps, then resumed, into ``cut``."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert invoke("distill", "--config", cfg, "--out", full, "--quiet").exit_code == 0
    with monkeypatch.context() as m:
        _interrupt_after(m, 8)
        assert invoke("distill", "--config", cfg, "--out", cut, "--quiet").exit_code != 0
    assert invoke("distill", "--config", cfg, "--out", cut, "--quiet", "--resume").exit_code == 0
    return full, cut


def test_ema_teacher_run_resumes_bit_exactly(tiny_config, tmp_path, monkeypatch):
    full, cut = _full_and_resumed(tiny_config("logit", teacher=EMA), tmp_path, monkeypatch)
    a, b = _final_params(full), _final_params(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = _state(full)["ema"], _state(cut)["ema"]
    assert all(torch.equal(ea["params"][k], eb["params"][k]) for k in ea["params"])


def _two_teachers(root, **extra):
    def one(widths, seed_dir):
        return {"arch": "small_cnn", "widths": widths, "weights": "none", "mode": "scratch", "fit_if_missing": True,
                "checkpoint": f"{root.as_posix()}/{seed_dir}/teacher.pt",
                "train": {"epochs": 1, "log_every": 2, "optimizer": {"name": "adam", "learning_rate": 1e-2}},
                **extra.get(seed_dir, {})}
    return {"a": one([8, 16], "a"), "b": one([6, 12], "b")}


ENSEMBLE_TERMS = """
[distill.terms.ce]
weight = 0.5
[distill.terms.logit]
weight = 0.5
temperature = 3.0
[distill.terms.feature]
weight = 0.1
teacher = "a"
"""


def test_two_teachers_fit_when_missing_and_distil_into_one_student(tiny_config, tmp_path):
    cfg = tiny_config("terms", ENSEMBLE_TERMS, teacher=None, teachers=_two_teachers(tmp_path),
                      distill={"student_features": ["block2"], "teacher_features": ["block2"]})
    out = tmp_path / "run"
    result = invoke("distill", "--config", cfg, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "teacher.pt").is_file() and (tmp_path / "b" / "teacher.pt").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["teachers"]) == {"a", "b"}
    assert 0 <= summary["teacher_test_acc"] <= 1
    state = _state(out)
    assert "block2->a:block2" in state["params"]["objective"]["feature"]  # FitNets on teacher a's features
    # the second run reads both teachers (and their caches) instead of fitting them; confidence-weighted (CA-MKD)
    again = invoke("distill", "--config", cfg, "--out", tmp_path / "run2", "--quiet", "--set", "distill.ensemble=confidence")
    assert again.exit_code == 0 and "fitting" not in again.output


def test_ensemble_term_sees_the_mixture_at_its_temperature():
    from fkd import losses
    from fkd.objective import build
    from fkd.terms import TermInputs

    obj = build({"logit": {"temperature": 2.0}}, teachers={"a": 1.0, "b": 3.0})
    s, t = torch.randn(5, 4), torch.randn(5, 2, 4)
    loss, _, _ = obj({}, {}, TermInputs(s, {}, torch.zeros(5, dtype=torch.int64), t, {}, None, torch.tensor(0)))
    p = 0.25 * torch.softmax(t[:, 0] / 2, -1) + 0.75 * torch.softmax(t[:, 1] / 2, -1)
    want = 4.0 * (p * (p.log() - torch.log_softmax(s / 2, -1))).sum(-1).mean()
    assert torch.allclose(loss, want, atol=1e-5)
    one, _, _ = build({"logit": {"temperature": 2.0, "teacher": "b"}}, teachers={"a": 1.0, "b": 3.0})(
        {}, {}, TermInputs(s, {}, torch.zeros(5, dtype=torch.int64), t, {}, None, torch.tensor(0)))
    assert torch.allclose(one, losses.soft_target_kl(s, t[:, 1], 2.0))


@pytest.mark.parametrize("terms, message", [
    ('[distill.terms.feature]\nweight = 1.0\n', "reads teacher features, which an ensemble does not have"),
    ('[distill.terms.lskd]\nweight = 1.0\n', "cannot read an ensemble"),
    ('[distill.terms.logit]\nteacher = "c"\n', "is not one of the teachers: a, b"),
])
def test_ensemble_refusals_are_one_line(tiny_config, tmp_path, terms, message):
    cfg = tiny_config("terms", terms, teacher=None, teachers=_two_teachers(tmp_path),
                      distill={"student_features": ["block2"], "teacher_features": ["block2"]})
    result = invoke("distill", "--config", cfg, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "run").exists()


def test_a_term_naming_a_teacher_needs_several(tiny_config, tmp_path):
    cfg = tiny_config("terms", '[distill.terms.logit]\nteacher = "a"\n')
    result = invoke("distill", "--config", cfg, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 2 and "has one [teacher]" in result.output


DML = "[distill.terms.ce]\nweight = 1.0\n[distill.terms.mutual]\nweight = 1.0\n"


def test_cohort_of_two_learns_mutually_and_each_member_evaluates(tiny_config, tmp_path):
    cfg = tiny_config("terms", DML, dataset="digits", cohort={"size": 2}, data={"train_limit": 96})
    out = tmp_path / "run"
    result = invoke("distill", "--config", cfg, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    members = summary["members"]
    assert set(members) == {"student1", "student2"}
    assert summary["student_test_acc"] == pytest.approx(sum(m["test_acc"] for m in members.values()) / 2)
    state = _state(out)
    a, b = state["params"]["model"]["student1"], state["params"]["model"]["student2"]
    assert any(not torch.equal(a[k], b[k]) for k in a)  # own initialisations
    for name, m in members.items():
        ev = invoke("evaluate", m["checkpoint"], "--json")
        assert ev.exit_code == 0, ev.output
        assert json.loads(ev.output[ev.output.index("{"):])["test_acc"] == pytest.approx(m["test_acc"])
    refused = invoke("evaluate", str(out))
    assert refused.exit_code == 2 and "members/<name>.pt" in refused.output


def test_cohort_gradients_are_each_members_own():
    """The cohort's summed loss gives member k exactly the gradient of its own CE + mutual loss."""
    from torch.func import grad

    from fkd.models import build_model
    from fkd.models.cohort import Cohort
    from fkd.objective import build, over_cohort
    from fkd.terms import TermInputs

    models = [build_model("small_cnn", 4, 16, (), seed=s, widths=[4, 8]) for s in (0, 1)]
    cohort = Cohort(("a", "b"), tuple(m[0] for m in models))
    params = {"a": models[0][1], "b": models[1][1]}
    buffers = {"a": models[0][2], "b": models[1][2]}
    obj = over_cohort(build({"ce": {"weight": 1.0}, "mutual": {"weight": 2.0, "temperature": 2.0}}), ("a", "b"))
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))

    def total(p):
        logits, feats, _ = cohort.apply(p, buffers, x, train=True)
        return obj({}, {}, TermInputs(logits, feats, y, None, {}, None, torch.tensor(0)))[0]

    g = grad(total)(params)
    from fkd import losses
    peer = {"a": "b", "b": "a"}
    for name in ("a", "b"):
        other, _, _ = cohort.member(peer[name]).apply(params[peer[name]], buffers[peer[name]], x, train=True)

        def own(p, name=name, other=other.detach()):
            z, _, _ = cohort.member(name).apply(p, buffers[name], x, train=True)
            return losses.cross_entropy(z, y) + 2.0 * 4.0 * torch.nn.functional.kl_div(
                torch.log_softmax(z / 2, -1), torch.softmax(other / 2, -1), reduction="batchmean")

        want = grad(own)(params[name])
        for k in want:
            assert torch.allclose(g[name][k], want[k], atol=1e-6), (name, k)
    vmapped = Cohort(("a", "b"), cohort.members, vmap=True)
    z_loop = cohort.apply(params, buffers, x, train=False)[0]
    assert torch.allclose(vmapped.apply(params, buffers, x, train=False)[0], z_loop, atol=1e-5)


def test_mutual_term_needs_a_cohort(tiny_config, tmp_path):
    result = invoke("distill", "--config", tiny_config("terms", DML), "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 2 and "[cohort] size = 2" in result.output


@pytest.mark.parametrize("changes", [{"teacher": EMA}, {"cohort": {"size": 2}}], ids=["ema", "cohort"])
def test_paradigms_sweep_over_seeds(tiny_config, tmp_path, changes):
    extra = DML if "cohort" in changes else ""
    cfg = tiny_config("terms" if extra else "logit", extra, train={"epochs": 1}, **changes)
    out = tmp_path / "sweep"
    result = invoke("sweep", "--config", cfg, "--seeds", "2", "--out", out, "--quiet", "--save", "all")
    assert result.exit_code == 0, result.output
    final = json.loads((out / "sweep_summary.json").read_text())["students_final"]
    assert len(final) == 2 and all(0 <= s["test_acc"] <= 1 and not s["diverged"] for s in final)
    # every saved student -- for a cohort, every member of every seed -- is one evaluate reads
    saved = sorted((out / "students").glob("*/*.pt" if extra else "*.pt"))
    assert len(saved) == (4 if extra else 2)
    ev = invoke("evaluate", saved[-1], "--json")
    assert ev.exit_code == 0, ev.output


def test_cohort_run_resumes_bit_exactly_and_a_member_exports(tiny_config, tmp_path, monkeypatch):
    full, cut = _full_and_resumed(tiny_config("terms", DML, cohort={"size": 2}), tmp_path, monkeypatch)
    a, b = _state(full), _state(cut)
    for name in ("student1", "student2"):
        for part in ("params", "buffers"):
            x = a[part]["model"][name] if part == "params" else a[part][name]
            y = b[part]["model"][name] if part == "params" else b[part][name]
            assert all(torch.equal(x[k], y[k]) for k in x), (name, part)
    exported = invoke("export", str(full / "members" / "student2.pt"), "--format", "pt2",
                      "--out", str(tmp_path / "exp" / "student2.pt2"), "--json")
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "exp" / "student2.pt2").is_file()


def test_mixed_cohort_of_two_architectures(tiny_config, tmp_path):
    members = {"small": {"arch": "small_cnn", "widths": [4, 8]}, "wide": {"arch": "small_cnn", "widths": [8, 16]}}
    cfg = tiny_config("terms", DML, cohort={"members": members}, train={"epochs": 1})
    out = tmp_path / "run"
    result = invoke("distill", "--config", cfg, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["members"]) == {"small", "wide"}
    refused = invoke("distill", "--config", cfg, "--out", tmp_path / "v", "--quiet", "--set", "cohort.strategy=vmap")
    assert refused.exit_code == 2 and "one architecture" in refused.output


def test_vmapped_cohort_trains_like_the_loop(tiny_config, tmp_path):
    runs = {}
    for strategy in ("loop", "vmap"):
        cfg = tiny_config("terms", DML, name=f"{strategy}.toml", cohort={"size": 2, "strategy": strategy},
                          train={"epochs": 1})
        result = invoke("distill", "--config", cfg, "--out", tmp_path / strategy, "--quiet")
        assert result.exit_code == 0, result.output
        runs[strategy] = _state(tmp_path / strategy)
    for name in ("student1", "student2"):
        a, b = runs["loop"]["params"]["model"][name], runs["vmap"]["params"]["model"][name]
        assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), name
        ba, bb = runs["loop"]["buffers"][name], runs["vmap"]["buffers"][name]
        assert all(torch.allclose(ba[k].float(), bb[k].float(), atol=1e-4) for k in ba), name
