"""fkd sweep: the plan (seeds x grid, groups), a student in a sweep equals the same student alone,
divergence stays local, interrupt and resume, the outputs."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fkd import cli
from fkd.checkpoint import load_checkpoint
from fkd.errors import ConfigError
from fkd.sweep.plan import in_chunks, parse_grid, parse_seeds, plan_sweep
from fkd.sweep.stats import NO_INTERVAL_WHY, describe, format_table, summarize, t_quantile_975
from tests.conftest import wrap_distill_step

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


# --- the plan -----------------------------------------------------------------------------------


def test_seeds_and_grid_parsing():
    assert parse_seeds("3") == (0, 1, 2) and parse_seeds("3,7,11") == (3, 7, 11)
    for bad in ("0", "x", "1,1"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    assert parse_grid(["distill.temperature=1,2.5", 'student.arch="seed_cnn",small_cnn']) == [
        ("distill.temperature", [1, 2.5]), ("student.arch", ["seed_cnn", "small_cnn"])]
    with pytest.raises(ConfigError, match="KEY=V1,V2"):
        parse_grid(["distill.temperature"])
    with pytest.raises(ConfigError, match="twice"):
        parse_grid(["train.epochs=1", "train.epochs=2"])


def test_students_group_by_what_one_step_can_serve(tiny_config):
    cfg = tiny_config("logit")
    plan = plan_sweep(cfg, [], (0, 1), parse_grid(["distill.temperature=1,4", "distill.alpha=0,0.5,0.9",
                                                    "train.optimizer.learning_rate=0.01,0.003"]))
    assert len(plan.students) == 2 * 3 * 2 * 2
    # alpha = 0 drops the KD term (the baseline); everything else is numbers inside one step.
    sizes = sorted(len(g.students) for g in plan.groups)
    assert sizes == [8, 16] and plan.describe() == "2 groups of 8/16 students (24 in all)"
    baseline = next(g for g in plan.groups if len(g.students) == 8)
    assert all(not s.objective.needs_teacher for s in baseline.students)
    # A different batch size is another shape: its own group.
    split = plan_sweep(cfg, [], (0,), parse_grid(["data.batch_size=8,16"]))
    assert len(split.groups) == 2
    assert sorted(len(g.students) for g in in_chunks(plan, 5).groups) == [1, 3, 5, 5, 5, 5]
    with pytest.raises(ConfigError, match="train.epochs must be"):
        plan_sweep(cfg, [], (0,), parse_grid(["train.epochs=0,1"]))
    with pytest.raises(ConfigError, match="--grid distill.temprature: no key 'temprature' in distill; did you mean"):
        plan_sweep(cfg, [], (0,), parse_grid(["distill.temprature=1,2"]))


def test_optimizer_and_schedule_numbers_do_not_split_a_group(tiny_config):
    # They are 0-d tensors in each student's optimizer state; names and static options are structure.
    cfg = tiny_config("logit")
    sgd = ["train.optimizer.name=sgd", "train.optimizer.schedule=warmup_cosine"]
    plan = plan_sweep(cfg, sgd, (0,), parse_grid([
        "train.optimizer.learning_rate=0.1,0.01", "train.optimizer.momentum=0,0.9",
        "train.optimizer.weight_decay=0,0.0005", "train.optimizer.warmup_epochs=0,1",
        "train.optimizer.clip_norm=1,5"]))
    assert plan.describe() == "1 group of 32 students"
    adam = plan_sweep(cfg, ["train.optimizer.schedule=multistep", "train.optimizer.milestones=[1]"], (0,), parse_grid([
        "train.optimizer.b1=0.8,0.9", "train.optimizer.eps=1e-8,1e-6", "train.optimizer.gamma=0.1,0.5"]))
    assert adam.describe() == "1 group of 8 students"
    for axis in ("train.optimizer.nesterov=false,true", "train.optimizer.clip_norm=0,1",
                 "train.optimizer.schedule=constant,cosine"):
        split = plan_sweep(cfg, [*sgd, "train.optimizer.momentum=0.9"], (0,), parse_grid([axis]))
        assert len(split.groups) == 2, axis


def test_statistics_over_seeds():
    d = describe([0.9, 0.92, 0.94])
    assert d["mean"] == pytest.approx(0.92) and d["std"] == pytest.approx(0.02)
    assert d["ci95"] == pytest.approx(4.303 * 0.02 / 3 ** 0.5)
    assert t_quantile_975(100) == 1.96 and describe([0.5])["n"] == 1
    assert (d["ci95_low"], d["ci95_high"]) == pytest.approx((0.92 - d["ci95"], 0.92 + d["ci95"]))


def test_intervals_are_clipped_to_what_an_accuracy_can_be():
    d = describe([0.2, 0.9, 0.99])  # a wide interval: the t bounds fall outside [0, 1]
    assert d["mean"] - d["ci95"] < 0 and d["mean"] + d["ci95"] > 1
    assert (d["ci95_low"], d["ci95_high"]) == (0.0, 1.0)
    table = format_table(summarize([{"point": "base", "seed": s, "test_acc": v, "diverged": False}
                                    for s, v in enumerate([0.2, 0.9, 0.99])], None), None)
    assert "0.00..100.00" in table and "-" not in table.splitlines()[2].split()[4]


def test_fewer_than_three_seeds_give_no_interval_but_the_values_and_why():
    two = describe([0.3, 0.9])
    assert two["ci95"] is None and two["ci95_low"] is None and two["values"] == [0.3, 0.9]
    rows = summarize([{"point": "base", "seed": s, "test_acc": v, "diverged": False} for s, v in enumerate([0.3, 0.9])],
                     None)
    table = format_table(rows, None)
    row = table.splitlines()[2]
    assert row.endswith("30.00, 90.00") and ".." not in row and NO_INTERVAL_WHY in table


def test_plots_have_titles_and_labelled_axes():
    from fkd.config import Config
    from fkd.rundir import curves_figure
    from fkd.sweep.plot import sweep_figure
    from fkd.titles import run_title, sweep_title

    cfg = Config()
    title = run_title(cfg, Path("runs/x"))
    assert title.startswith(f"runs/x (config {cfg.name}, {cfg.data.name}): student {cfg.student.arch} ← teacher "
                            f"{cfg.teacher.arch}, method {cfg.distill.preset}")
    records = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.5, "test_acc": 0.6} for e in (1, 2)]
    fig = curves_figure(records, title)
    assert fig._suptitle.get_text() == title
    assert [ax.get_ylabel() for ax in fig.axes] == ["training loss (mean over the epoch's batches)", "accuracy (%)"]
    assert all(ax.get_xlabel() == "epoch" for ax in fig.axes)
    rows = summarize([{"point": f"distill.alpha={a}", "seed": s, "test_acc": 0.5 + 0.1 * s, "diverged": False}
                      for a in (0, 0.5) for s in (0, 1)], None)
    stitle = sweep_title(cfg, Path("runs/x-sweep"), (0, 1), interval=False)
    assert "2 seeds per point (0, 1)" in stitle and "no interval" in stitle
    sfig = sweep_figure((("distill.alpha", (0, 0.5)),), rows, stitle)
    ax = sfig.axes[0]
    assert ax.get_title() == stitle and ax.get_ylabel() == "test accuracy (%)"
    assert ax.get_xlabel() == "distill.alpha (swept value)"
    import matplotlib.pyplot as plt

    plt.close(fig)
    plt.close(sfig)


# --- against distill --------------------------------------------------------------------------------


def _sweep_params(out, label):
    return load_checkpoint(out / "students" / f"{label}.pt", "student_run")["state"]["params"]["model"]


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_a_student_in_a_sweep_equals_the_same_student_alone(tiny_config, tmp_path, strategy):
    cfg = tiny_config("logit")
    alone = tmp_path / "alone"
    assert invoke("distill", "--config", cfg, "--out", alone, "--quiet", "--seed", "1",
                  "--set", "distill.temperature=4").exit_code == 0
    out = tmp_path / f"sweep-{strategy}"
    result = invoke("sweep", "--config", cfg, "--out", out, "--quiet", "--seeds", "0,1", "--strategy", strategy,
                    "--grid", "distill.temperature=2,4", "--save", "all")
    assert result.exit_code == 0, result.output
    assert "1 group of 4 students" in result.output
    a = load_checkpoint(alone / "checkpoints" / "latest.pt", "student_run")["state"]["params"]["model"]
    b = _sweep_params(out, "distill.temperature=4__seed=1")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    alone_acc = json.loads((alone / "summary.json").read_text())["student_test_acc"]
    final = {s["student"]: s for s in json.loads((out / "sweep_summary.json").read_text())["students_final"]}
    assert abs(final["distill.temperature=4__seed=1"]["test_acc"] - alone_acc) <= 1 / 48 + 1e-9  # one test image
    # The saved student is a run checkpoint evaluate reads.
    report = invoke("evaluate", out / "students" / "distill.temperature=4__seed=1.pt", "--json", "--device", "cpu")
    assert report.exit_code == 0, report.output


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_optimizer_hyperparameters_sweep_in_one_group(tiny_config, tmp_path, strategy):
    # Momentum and weight decay are 0-d tensors in each student's optimizer state: one group, one step,
    # and each student equals the same distill run.
    cfg = tiny_config("logit")
    sgd = ["--set", "train.optimizer.name=sgd", "--set", "train.optimizer.learning_rate=0.05"]
    alone = tmp_path / "alone"
    result = invoke("distill", "--config", cfg, "--out", alone, "--quiet", *sgd,
                    "--set", "train.optimizer.momentum=0.9", "--set", "train.optimizer.weight_decay=0.0005")
    assert result.exit_code == 0, result.output
    out = tmp_path / f"sweep-{strategy}"
    result = invoke("sweep", "--config", cfg, "--out", out, "--quiet", "--seeds", "1", "--strategy", strategy, *sgd,
                    "--grid", "train.optimizer.momentum=0,0.9", "--grid", "train.optimizer.weight_decay=0,0.0005",
                    "--save", "all")
    assert result.exit_code == 0, result.output
    assert "1 group of 4 students" in result.output
    a = load_checkpoint(alone / "checkpoints" / "latest.pt", "student_run")["state"]["params"]["model"]
    b = _sweep_params(out, "train.optimizer.momentum=0.9,train.optimizer.weight_decay=0.0005__seed=0")
    c = _sweep_params(out, "train.optimizer.momentum=0,train.optimizer.weight_decay=0__seed=0")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    assert any(not torch.allclose(c[k], a[k]) for k in a)  # the members really differ


def test_outputs_and_baseline(tiny_config, tmp_path):
    out = tmp_path / "sweep"
    result = invoke("sweep", "--config", tiny_config("logit"), "--out", out, "--quiet", "--seeds", "2",
                    "--grid", "distill.alpha=0,0.7", "--save", "best")
    assert result.exit_code == 0, result.output
    assert "distill.alpha=0 (baseline)" in result.output and "vs baseline" in result.output
    records = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    assert len(records) == 4 * 2  # 4 students x 2 epochs
    assert {"student", "point", "seed", "epoch", "train_loss", "train_acc", "test_acc", "diverged"} <= set(records[0])
    summary = json.loads((out / "sweep_summary.json").read_text())
    assert summary["baseline"] == "distill.alpha=0" and len(summary["points"]) == 2
    for row in summary["points"]:  # two seeds: no interval, the values instead, and a line that says why
        assert row["n"] == 2 and row["min"] <= row["mean"] <= row["max"] and row["ci95"] is None
        assert sorted(row["values"]) == [row["min"], row["max"]]
    assert NO_INTERVAL_WHY in result.output and "values" in result.output
    assert (out / "sweep.png").is_file() and len(list((out / "students").glob("*.pt"))) == 1
    again = invoke("sweep", "--config", tiny_config("logit"), "--out", out, "--quiet", "--seeds", "2")
    assert again.exit_code == 2 and "--resume" in again.output


def test_a_diverging_student_is_frozen_and_the_others_go_on(tiny_config, tmp_path):
    out = tmp_path / "sweep"
    result = invoke("sweep", "--config", tiny_config("logit"), "--out", out, "--quiet", "--seeds", "1",
                    "--grid", "train.optimizer.learning_rate=0.01,1e38", "--save", "all")
    assert result.exit_code == 0, result.output
    final = {s["point"]: s for s in json.loads((out / "sweep_summary.json").read_text())["students_final"]}
    assert final["train.optimizer.learning_rate=1e+38"]["diverged"] is True
    assert final["train.optimizer.learning_rate=0.01"]["diverged"] is False
    params = _sweep_params(out, "train.optimizer.learning_rate=1e+38__seed=0")
    assert all(torch.isfinite(t).all() for t in params.values())  # frozen at its last good weights


@pytest.mark.parametrize("stop_at", [4 * 8, 4 * 6], ids=["mid-epoch", "epoch-end"])
def test_interrupted_sweep_resumes_bit_exactly(tiny_config, tmp_path, monkeypatch, stop_at):
    cfg = tiny_config("logit")
    args = ["--config", cfg, "--quiet", "--seeds", "2", "--grid", "distill.temperature=2,4", "--strategy", "loop",
            "--save", "all"]
    full = tmp_path / "full"
    assert invoke("sweep", "--out", full, *args).exit_code == 0
    cut = tmp_path / "cut"

    def interrupt(n, batch):
        if n == stop_at:  # 4 students a step, 6 steps an epoch: in epoch 2, or at epoch 1's last step
            signal.raise_signal(signal.SIGINT)

    with monkeypatch.context() as m:
        wrap_distill_step(m, interrupt)
        stopped = invoke("sweep", "--out", cut, *args)
    assert stopped.exit_code == 128 + signal.SIGINT and "--resume" in stopped.output
    resumed = invoke("sweep", "--out", cut, *args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    for f in (full / "students").glob("*.pt"):
        a, b = _sweep_params(full, f.stem), _sweep_params(cut, f.stem)
        for k in a:
            assert torch.equal(a[k], b[k]), (f.stem, k)
    assert (full / "sweep.jsonl").read_text().count("\n") == (cut / "sweep.jsonl").read_text().count("\n")
    changed = invoke("sweep", "--out", cut, *args[:-2], "--resume", "--grid", "distill.alpha=0.5")
    assert changed.exit_code == 2 and "another config or grid" in changed.output


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_random_views_share_one_order_and_run_the_teacher_live(tiny_config, tmp_path, strategy):
    cfg = tiny_config("logit", data={"flip": True})
    out = tmp_path / strategy
    result = invoke("sweep", "--config", cfg, "--out", out, "--quiet", "--seeds", "2", "--strategy", strategy,
                    "--set", "train.epochs=1", "--save", "all")
    assert result.exit_code == 0, result.output
    assert "shared order: seeds vary initialisation only" in result.output
    # Seeds still give different students (their initialisations differ), trained on the same batches.
    a, b = (_sweep_params(out, f"base__seed={s}") for s in (0, 1))
    assert not torch.equal(a["fc.weight"], b["fc.weight"])
