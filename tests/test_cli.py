"""End to end: every command on tiny synthetic data, the run directory, resume."""

from __future__ import annotations

import json
import os
import signal
import tomllib

import pytest
import torch
from click.testing import CliRunner

from fkd import cli
from fkd.checkpoint import load_checkpoint
from fkd.build import load_config
from tests.conftest import wrap_distill_step


def invoke(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    return result


def test_help_lists_commands_and_examples():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("teacher", "distill", "evaluate"):
        assert command in result.output
    for command in ("teacher", "distill", "evaluate"):
        sub = invoke(command, "--help")
        assert sub.exit_code == 0 and "Examples:" in sub.output


def test_teacher_command_writes_checkpoint_and_run_directory(tiny_config, tmp_path):
    cfg = tiny_config("none")
    out = tmp_path / "teacher-run"
    result = invoke("teacher", "--config", cfg, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    teacher = load_checkpoint(tmp_path / "teacher" / "teacher.pt", "teacher")
    assert teacher["model"]["arch"] == "small_cnn" and 0.0 <= teacher["test_acc"] <= 1.0
    for name in ("config.toml", "metrics.jsonl", "summary.json", "checkpoints/latest.pt"):
        assert (out / name).is_file(), name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


@pytest.mark.parametrize("method", ["none", "logit", "feature", "attention"])
def test_distill_each_method_end_to_end(tiny_config, tmp_path, method):
    cfg = tiny_config(method, extra="beta = 1.0" if method == "attention" else "")
    out = tmp_path / f"run-{method}"
    result = invoke("distill", "--config", cfg, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method
    assert 0.0 <= summary["student_test_acc"] <= 1.0
    assert summary["student_params"] > 0 and summary["student_cpu_latency_ms"] > 0
    if method == "none":
        assert "teacher_test_acc" not in summary
        assert not (tmp_path / "teacher" / "teacher.pt").exists()  # no teacher needed, none fitted
    else:
        assert summary["teacher_test_acc"] is not None
        assert summary["compression_ratio"] == pytest.approx(summary["teacher_params"] / summary["student_params"])
        assert "student (small_cnn" in result.output and "teacher (small_cnn)" in result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train_loss", "train_acc", "test_acc", "images_per_s", "lr", "wall_seconds"):
        assert all(r[key] is not None for r in records), key
    if method in ("feature", "attention"):
        assert all(f"train_{method}" in r for r in records)
    # the resolved config in the run directory reads back to the config that ran
    assert load_config(out / "config.toml") == load_config(cfg, ['name="tiny"'])
    assert (out / "curves.png").stat().st_size > 1000
    state = load_checkpoint(out / "checkpoints" / "latest.pt", "student_run")
    assert state["epoch"] == 2 and state["batch"] == 0
    assert not any(k.startswith("teacher") for k in state["state"])  # the teacher is never saved with the student


def test_combined_method_uses_given_weights(tiny_config, tmp_path):
    cfg = tiny_config("combined", extra="weights = {ce = 0.5, logit = 0.25, feature = 0.25}")
    out = tmp_path / "combined"
    result = invoke("distill", "--config", cfg, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_ce", "train_logit", "train_feature"} <= set(record)
    assert "train_attention" not in record


def test_distill_fits_missing_teacher_only_when_allowed(tiny_config, tmp_path):
    cfg = tiny_config("logit", extra="")
    text = cfg.read_text().replace("fit_if_missing = true", "fit_if_missing = false")
    cfg.write_text(text)
    result = invoke("distill", "--config", cfg, "--out", tmp_path / "x", "--quiet")
    assert result.exit_code == 2
    assert "does not exist" in result.output and "fit_if_missing" in result.output
    assert "Traceback" not in result.output
    result = invoke("distill", "--config", cfg, "--out", tmp_path / "x", "--quiet",
                    "--set", "teacher.fit_if_missing=true")
    assert result.exit_code == 0, result.output
    assert "fitting the teacher first" in result.output
    assert (tmp_path / "teacher" / "teacher.pt").is_file()


def test_baseline_accuracy_appears_in_later_summaries(tiny_config, tmp_path):
    runs = tmp_path / "runs"
    assert invoke("distill", "--config", tiny_config("none"), "--out", runs / "baseline", "--quiet").exit_code == 0
    assert invoke("distill", "--config", tiny_config("logit"), "--out", runs / "logit", "--quiet").exit_code == 0
    base = json.loads((runs / "baseline" / "summary.json").read_text())
    logit = json.loads((runs / "logit" / "summary.json").read_text())
    assert logit["baseline_test_acc"] == base["student_test_acc"]


def test_evaluate_run_directory_and_checkpoint(tiny_config, tmp_path):
    out = tmp_path / "run"
    assert invoke("distill", "--config", tiny_config("logit"), "--out", out, "--quiet").exit_code == 0
    result = invoke("evaluate", out, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    summary = json.loads((out / "summary.json").read_text())
    assert report["test_acc"] == pytest.approx(summary["student_test_acc"])
    assert report["params"] == summary["student_params"]
    assert set(report["per_class_acc"]) == {"class_0", "class_1", "class_2", "class_3"}
    assert report["cpu_latency"]["batch_size"] == 1 and report["cpu_latency"]["threads"] == 1
    assert "ms/img, batch 1, 1 thread" in summary["student_cpu_latency"]["text"]
    teacher = invoke("evaluate", tmp_path / "teacher" / "teacher.pt", "--device", "cpu", "--threads", "2")
    assert teacher.exit_code == 0 and "test accuracy" in teacher.output and "per class" in teacher.output
    assert "ms/img, batch 1, 2 threads" in teacher.output  # the figure says how it was measured


def test_set_overrides_are_type_checked(tiny_config, tmp_path):
    cfg = tiny_config("logit")
    bad = invoke("distill", "--config", cfg, "--out", tmp_path / "r", "--set", "train.epochs=two")
    assert bad.exit_code == 2 and "train.epochs must be an integer" in bad.output
    unknown = invoke("distill", "--config", cfg, "--out", tmp_path / "r", "--set", "train.epoch=2")
    assert unknown.exit_code == 2 and "did you mean 'epochs'" in unknown.output
    assert not (tmp_path / "r").exists()  # nothing written for bad input


def test_existing_run_is_not_overwritten_without_resume(tiny_config, tmp_path):
    cfg, out = tiny_config("none"), tmp_path / "run"
    assert invoke("distill", "--config", cfg, "--out", out, "--quiet").exit_code == 0
    before = (out / "checkpoints" / "latest.pt").read_bytes()
    again = invoke("distill", "--config", cfg, "--out", out, "--quiet")
    assert again.exit_code == 2 and "--resume" in again.output
    assert (out / "checkpoints" / "latest.pt").read_bytes() == before


def _final_params(out):
    return load_checkpoint(out / "checkpoints" / "latest.pt", "student_run")["state"]["params"]["model"]


def _interrupt_after(monkeypatch, n_steps, signum=signal.SIGTERM):
    """Make the distill step send ``signum`` to this process at its ``n_steps``-th call."""

    def maybe_signal(n, batch):
        if n == n_steps:
            os.kill(os.getpid(), signum)

    wrap_distill_step(monkeypatch, maybe_signal)


@pytest.mark.parametrize("flip, signum", [(False, signal.SIGTERM), (True, signal.SIGINT)])
def test_interrupt_then_resume_is_bit_exact(tiny_config, tmp_path, monkeypatch, flip, signum):
    # with flip = true, random augmentation too: its randomness must be replayed exactly
    cfg = tiny_config("feature", data={"flip": True} if flip else {})
    full = tmp_path / "full"
    assert invoke("distill", "--config", cfg, "--out", full, "--quiet").exit_code == 0

    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        _interrupt_after(m, 8, signum)  # 6 steps per epoch: stops mid-way through epoch 2
        result = invoke("distill", "--config", cfg, "--out", cut, "--quiet")
    assert result.exit_code == 128 + signum, result.output
    assert "--resume" in result.output and "Traceback" not in result.output
    saved = load_checkpoint(cut / "checkpoints" / "latest.pt", "student_run")
    assert (saved["epoch"], saved["batch"]) == (1, 2)

    resumed = invoke("distill", "--config", cfg, "--out", cut, "--quiet", "--resume")
    assert resumed.exit_code == 0, resumed.output
    a, b = _final_params(full), _final_params(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [json.loads(x)["epoch"] for x in (cut / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_interrupt_at_an_epoch_end_keeps_that_epoch_record(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config("logit")
    full = tmp_path / "full"  # fits the teacher, so that the counted steps below are the student's
    assert invoke("distill", "--config", cfg, "--out", full, "--quiet").exit_code == 0
    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        _interrupt_after(m, 6)  # 6 steps per epoch: the signal arrives at epoch 1's last step
        result = invoke("distill", "--config", cfg, "--out", cut, "--quiet")
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    saved = load_checkpoint(cut / "checkpoints" / "latest.pt", "student_run")
    assert (saved["epoch"], saved["batch"]) == (1, 0)
    assert [json.loads(x)["epoch"] for x in (cut / "metrics.jsonl").read_text().splitlines()] == [1]
    resumed = invoke("distill", "--config", cfg, "--out", cut, "--quiet", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert [json.loads(x)["epoch"] for x in (cut / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    a, b = _final_params(full), _final_params(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_nothing_to_resume_fails_clearly(tiny_config, tmp_path):
    result = invoke("distill", "--config", tiny_config("none"), "--out", tmp_path / "new", "--resume")
    assert result.exit_code == 2 and "nothing to resume" in result.output


def test_start_is_a_line_and_the_config_is_echoed_only_with_verbose(tiny_config, tmp_path):
    cfg = tiny_config("none")
    result = invoke("distill", "--config", cfg, "--out", tmp_path / "r", "--quiet", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    assert "# resolved config" not in result.output and "[train]" not in result.output
    first = result.output.splitlines()[0]
    assert first.startswith("distill: student small_cnn, method none") and "1 epoch on synthetic" in first
    assert f"run directory {tmp_path / 'r'}" in first
    written = tomllib.loads((tmp_path / "r" / "config.toml").read_text())
    assert written["train"]["epochs"] == 1
    verbose = invoke("distill", "--config", cfg, "--out", tmp_path / "v", "--quiet", "--set", "train.epochs=1",
                     "--verbose")
    assert verbose.exit_code == 0
    assert "# resolved config" in verbose.output and "epochs = 1" in verbose.output


@pytest.mark.parametrize("args", [
    ("--set", "train.epochs=0"),             # refused by the config
    ("--set", "no_such.key=1"),              # an unknown key
    ("--resume",),                           # nothing to resume
])
def test_a_refusal_prints_exactly_one_line(tiny_config, tmp_path, args):
    result = CliRunner().invoke(cli.main, ["distill", "--config", str(tiny_config("none")), "--out",
                                           str(tmp_path / "r"), *args])
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output


def test_config_command_prints_resolved_config_and_keys(tiny_config):
    result = invoke("config", "--config", tiny_config("logit"), "--set", "distill.temperature=4")
    assert result.exit_code == 0
    assert tomllib.loads(result.output)["distill"]["terms"]["logit"]["temperature"] == 4.0  # the expanded tables
    keys = invoke("config", "--keys")
    assert keys.exit_code == 0 and "distill.temperature" in keys.output and "softmax temperature" in keys.output


def test_evaluate_with_overrides_and_report_file(tiny_config, tmp_path):
    out = tmp_path / "run"
    assert invoke("distill", "--config", tiny_config("logit"), "--out", out, "--quiet").exit_code == 0
    result = invoke("evaluate", out, "--device", "cpu", "--json", "--set", "data.eval_batch_size=7",
                    "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    assert written["test_acc"] == json.loads(result.output.splitlines()[-1])["test_acc"]
    bad = invoke("evaluate", out, "--set", "data.name=nothing")
    assert bad.exit_code == 2 and "data.name = 'nothing' is not a known data set" in bad.output


def test_resume_refuses_a_checkpoint_of_another_state_layout(tiny_config, tmp_path):
    from fkd.checkpoint import save_checkpoint

    cfg, out = tiny_config("none"), tmp_path / "run"
    assert invoke("distill", "--config", cfg, "--out", out, "--quiet", "--set", "train.epochs=1").exit_code == 0
    latest = out / "checkpoints" / "latest.pt"
    saved = load_checkpoint(latest, "student_run")
    saved["state"].pop("objective")  # as written by an fkd from before loss terms kept state
    save_checkpoint(latest, {k: v for k, v in saved.items() if k not in ("fkd", "kind")}, "student_run")
    before = latest.read_bytes()
    result = invoke("distill", "--config", cfg, "--out", out, "--quiet", "--set", "train.epochs=2", "--resume")
    assert result.exit_code == 2 and "another layout" in result.output and "Traceback" not in result.output
    assert latest.read_bytes() == before
