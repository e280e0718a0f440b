"""Beyond one student and one frozen teacher: a mean (EMA) teacher, several teachers, cohorts -- from the CLI."""

from __future__ import annotations

import json

import torch

from fkd.checkpoint import load_checkpoint
from tests.test_cli import _final_params, _interrupt_after, invoke

EMA = {"source": "ema", "decay": 0.9, "arch": "resnet18", "fit_if_missing": False}


def _state(run):
    return load_checkpoint(run / "checkpoints" / "latest.pt", "student_run")["state"]


def test_ema_teacher_trains_without_a_checkpoint_and_keeps_the_average(tiny_config, tmp_path):
    cfg = tiny_config("logit", dataset="digits", teacher=EMA, data={"train_limit": 96})
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


def test_ema_teacher_run_resumes_bit_exactly(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("logit", teacher=EMA)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert invoke("distill", "--config", cfg, "--out", full, "--quiet").exit_code == 0
    with monkeypatch.context() as m:
        _interrupt_after(m, 8)
        assert invoke("distill", "--config", cfg, "--out", cut, "--quiet").exit_code != 0
    assert invoke("distill", "--config", cfg, "--out", cut, "--quiet", "--resume").exit_code == 0
    a, b = _final_params(full), _final_params(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = _state(full)["ema"], _state(cut)["ema"]
    assert all(torch.equal(ea["params"][k], eb["params"][k]) for k in ea["params"])
