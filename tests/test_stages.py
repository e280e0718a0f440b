"""Pipelines ([[stages]]) from the CLI: stages run in order, a stage learns from an earlier stage's model, a
re-run skips finished stages, an interrupted stage resumes bit-exactly, and every refusal is one line that
writes nothing. One tiny three-stage chain (teacher fit -> assistant -> student) is run once for the module."""

from __future__ import annotations

import json
import os
import re
import signal
import tomllib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fkd import cli
from fkd.checkpoint import load_checkpoint
from fkd.stages import AS_TEACHER, PIPELINE_JSON, format_pipeline_table, is_pipeline_file, plan_pipeline
from tests.conftest import tiny_config_dict, tiny_config_text, toml_text
from tests.test_errors import assert_clean_failure
from tests.test_reliability import snapshot

ROOT = Path(__file__).resolve().parents[1]
STAGE_NAMES = ("t", "a", "b")


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def stage_text(stage: dict) -> str:
    """One ``[[stages]]`` table: its plain keys, then its sub-tables as ``[stages.<key>]`` (which TOML gives to
    the stage just opened)."""
    lines = ["[[stages]]"] + [toml_text({k: v}) for k, v in stage.items() if not isinstance(v, dict)]
    lines += [toml_text(v, f"stages.{k}") for k, v in stage.items() if isinstance(v, dict)]
    return "\n".join(lines)


def pipeline_text(root: Path, stages: list[dict], **changes) -> str:
    """The tiny config (logit KD, small_cnn teacher and student, 2 epochs, synthetic data) as the shared base of
    ``stages``; ``changes`` merge into the base as for :func:`tests.conftest.tiny_config_dict`."""
    base = tiny_config_dict(root, "logit", **{"name": "chain", **changes})
    return toml_text(base) + "\n\n" + "\n\n".join(stage_text(s) for s in stages) + "\n"


#: teacher fit (into its own run directory) -> assistant (a wider student) -> student, each from the one before
CHAIN = [
    {"name": "t", "kind": "teacher", "teacher": {"checkpoint": ""}},
    {"name": "a", "kind": "distill", "teacher": {"from_stage": "t"}, "student": {"widths": [6, 12]}},
    {"name": "b", "kind": "distill", "teacher": {"from_stage": "a"}},
]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The tiny chain, run once from the CLI -> ``(pipeline file, its folder, the command's output)``."""
    root = tmp_path_factory.mktemp("chain")
    path = root / "chain.toml"
    path.write_text(pipeline_text(root, CHAIN))
    out = root / "runs" / "chain"
    result = invoke("distill", "--config", path, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return path, out, result.output


def summary(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "summary.json").read_text())


def final_params(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "latest.pt", "student_run")["state"]["params"]["model"]


def test_stages_run_in_order_and_a_later_stage_learns_from_an_earlier_model(chain):
    path, out, output = chain
    t, a, b = (summary(out, s) for s in STAGE_NAMES)
    # the teacher stage fitted its teacher into its own run directory; the assistant learned from it
    assert t["kind"] == "teacher" and t["checkpoint"] == str(out / "t" / "teacher.pt")
    assert a["teacher_checkpoint"] == (out / "t" / "teacher.pt").as_posix()
    assert a["teacher_test_acc"] == t["teacher_test_acc"]
    # the student learned from the assistant's trained student, written as a teacher checkpoint
    assert b["teacher_checkpoint"] == (out / "a" / AS_TEACHER).as_posix()
    assert b["teacher_test_acc"] == a["student_test_acc"]
    as_teacher = load_checkpoint(out / "a" / AS_TEACHER, "teacher")
    trained = final_params(out / "a")
    assert as_teacher["params"].keys() == trained.keys()
    assert all(torch.equal(as_teacher["params"][k], trained[k]) for k in trained)
    # from_stage filled in the teacher's architecture and options: only from_stage was written
    b_teacher = tomllib.loads((out / "b" / "config.toml").read_text())["teacher"]
    assert (b_teacher["arch"], b_teacher["widths"], b_teacher["fit_if_missing"]) == ("small_cnn", [6, 12], False)
    assert b["teacher_params"] == a["student_params"] != t["params"]
    # pipeline.json and the table
    rows = json.loads((out / PIPELINE_JSON).read_text())["stages"]
    assert [(r["stage"], r["kind"], r["run_dir"]) for r in rows] == [(s, k, str(out / s)) for s, k in
                                                                      zip(STAGE_NAMES, ["teacher", "distill", "distill"])]
    assert [r["test_acc"] for r in rows] == [t["teacher_test_acc"], a["student_test_acc"], b["student_test_acc"]]
    assert rows[2]["teacher"]["stage"] == "a" and rows[0]["teacher"] is None
    assert format_pipeline_table(rows) in output
    heads = [line for line in output.splitlines() if line.startswith("stage ") and "/3 '" in line]
    assert [h.split("'")[1] for h in heads] == list(STAGE_NAMES) and all(h.endswith(": starting") for h in heads)


def test_evaluate_and_export_take_a_stage_run_directory(chain, tmp_path):
    _, out, _ = chain
    for stage, key in (("b", "student_test_acc"), ("t", "teacher_test_acc")):
        result = invoke("evaluate", out / stage, "--device", "cpu", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["test_acc"] == pytest.approx(summary(out, stage)[key])
    result = invoke("export", out / "b", "--format", "pt2", "--teacher", "--latency-repeats", "0", "--json",
                    "--out", tmp_path / "teacher.pt2")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.output.splitlines()[-1])
    assert (entry["role"], entry["checkpoint"]) == ("teacher", (out / "a" / AS_TEACHER).as_posix())
    assert entry["fkd_test_acc"] == pytest.approx(summary(out, "a")["student_test_acc"])


def test_a_rerun_skips_finished_stages(chain, monkeypatch):
    path, out, _ = chain
    before = {s: snapshot(out / s) for s in STAGE_NAMES}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr("fkd.run_setup.make_train_step", no_training)
    result = invoke("distill", "--config", path, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.output.count("finished, skipped") == 3
    assert {s: snapshot(out / s) for s in STAGE_NAMES} == before
    assert all(r["skipped"] for r in json.loads((out / PIPELINE_JSON).read_text())["stages"])


def test_an_interrupted_stage_resumes_bit_exactly(chain, tmp_path, monkeypatch):
    path, full, _ = chain
    import fkd.run_setup

    real, built = fkd.run_setup.make_train_step, []

    def stop_stage_b_mid_epoch_2(*args, **kwargs):
        step, calls = real(*args, **kwargs), []
        built.append(step)

        def counting(state, batch, *rest):
            calls.append(1)
            if len(built) == 3 and len(calls) == 8:  # the third stage; 6 steps per epoch
                os.kill(os.getpid(), signal.SIGTERM)
            return step(state, batch, *rest)

        return counting

    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(fkd.run_setup, "make_train_step", stop_stage_b_mid_epoch_2)
        result = invoke("distill", "--config", path, "--out", cut, "--quiet")
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert "Resume with:" in result.output and "Traceback" not in result.output
    saved = load_checkpoint(cut / "b" / "checkpoints" / "latest.pt", "student_run")
    assert (saved["epoch"], saved["batch"]) == (1, 2)
    assert not (cut / "b" / "summary.json").exists() and (cut / "a" / "summary.json").is_file()

    resumed = invoke("distill", "--config", path, "--out", cut, "--quiet", "--resume")  # the hint's command
    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.count("finished, skipped") == 2 and "'b' (distill, small_cnn)" in resumed.output
    assert "resuming from its checkpoint" in resumed.output
    a, b = final_params(full / "b"), final_params(cut / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["epoch"] for x in (cut / "b" / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def _stages(**changes_by_stage) -> list[dict]:
    """The chain with ``{stage name: table}`` merged into each named stage (a value None drops the key)."""
    out = []
    for stage in CHAIN:
        table = {**stage, **changes_by_stage.get(stage["name"], {})}
        out.append({k: v for k, v in table.items() if v is not None})
    return out


REFUSED = {
    "unknown stage": (_stages(b={"teacher": {"from_stage": "aa"}}), "'aa' is not a stage", "did you mean 'a'?"),
    "itself": (_stages(b={"teacher": {"from_stage": "b"}}), "stage 'b' names itself"),
    "a later stage": (_stages(a={"teacher": {"from_stage": "b"}}), "names a later stage", "move 'b' above 'a'"),
    "duplicate names": (_stages(b={"name": "a"}), "two stages are named 'a'"),
    "no kind": (_stages(b={"kind": None}), "stage 'b' has no kind"),
    "a missing teacher": (_stages(a={"teacher": {"checkpoint": "/nonexistent/t.pt", "fit_if_missing": False}}),
                          "stage 'a'", "does not exist", "fit_if_missing"),
    "a teacher without a checkpoint": (_stages(a={"teacher": {"checkpoint": ""}}), "stage 'a'", "teacher.checkpoint is empty"),
    "a parse error in the last stage": (_stages(b={"train": {"epoch": 3}}), "stage 'b'", "did you mean 'epochs'"),
    "an unknown option in a stage": (_stages(a={"student": {"width": [6]}}), "stage 'a'", "student.width"),
    "from_stage beside teacher.arch": (_stages(b={"teacher": {"from_stage": "a", "arch": "seed_cnn"}}),
                                       "teacher.arch beside teacher.from_stage"),
    "from_stage without a teacher term": (_stages(b={"distill": {"method": "none"}}), "no teacher term"),
    "from_stage on a teacher stage": (_stages(t={"teacher": {"from_stage": "a"}}), "teacher stage"),
    "a teacher stage over an existing checkpoint": (_stages(t={"teacher": {"checkpoint": "EXISTING"}}),
                                                    "already exists"),
    "no stages": ([], "non-empty array"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_pipelines_say_why_in_one_line_and_write_nothing(case, tmp_path):
    stages, *phrases = REFUSED[case]
    existing = tmp_path / "existing.pt"
    existing.write_bytes(b"a teacher someone fitted")
    text = pipeline_text(tmp_path, stages).replace('"EXISTING"', json.dumps(existing.as_posix()))
    if not stages:
        text = "stages = []\n" + text
    path = tmp_path / "p.toml"
    path.write_text(text)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("untouched")
    before = snapshot(tmp_path)
    assert_clean_failure(invoke("distill", "--config", path, "--out", out, "--quiet"), *phrases)
    assert snapshot(tmp_path) == before


def test_a_finished_stage_with_another_config_is_refused(chain):
    path, out, _ = chain
    before = snapshot(out)
    assert_clean_failure(invoke("distill", "--config", path, "--out", out, "--quiet", "--set", "train.epochs=3"),
                         "stage 't' finished", "with another config", "--out")
    assert snapshot(out) == before


def test_from_stage_outside_a_pipeline_is_one_clear_error(tmp_path):
    path = tmp_path / "plain.toml"
    path.write_text(tiny_config_text(tmp_path, "logit", teacher={"from_stage": "a"}))
    for command in ("distill", "teacher"):
        assert_clean_failure(invoke(command, "--config", path, "--out", tmp_path / "r"), "teacher.from_stage",
                             "pipeline", "teacher.checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.toml"]


def test_the_other_commands_send_a_pipeline_to_distill(chain, tmp_path):
    path, _, _ = chain
    for command in (["teacher", "--out", tmp_path / "x"], ["config"]):
        assert_clean_failure(invoke(*command, "--config", path), "pipeline", "fkd distill")
    assert_clean_failure(invoke("sweep", "--config", path, "--seeds", "2", "--grid", "distill.alpha=0,1", "--out",
                                tmp_path / "x"), "--grid does not apply to a pipeline")
    assert not (tmp_path / "x").exists()


def test_a_pipeline_sweeps_over_seeds(tmp_path):
    stages = [{"name": "gen1", "kind": "distill", "distill": {"method": "none"}},
              {"name": "gen2", "kind": "distill", "teacher": {"from_stage": "gen1"}}]
    path = tmp_path / "ban.toml"
    path.write_text(pipeline_text(tmp_path, stages, train={"epochs": 1}))
    out = tmp_path / "sweep"
    result = invoke("sweep", "--config", path, "--seeds", "2", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    table = json.loads((out / "pipeline_sweep.json").read_text())
    assert table["seeds"] == [0, 1] and table["baseline"] == "gen1"
    for row in table["stages"]:
        accs = [summary(out / f"seed-{s}", row["stage"])["student_test_acc"] for s in (0, 1)]
        assert row["test_acc"] == accs and row["mean"] == pytest.approx(sum(accs) / 2)
    gen2 = table["stages"][1]
    assert gen2["vs_baseline"] == pytest.approx(gen2["mean"] - table["stages"][0]["mean"])
    for seed in (0, 1):  # each seed's chain learns from its own earlier stage
        assert summary(out / f"seed-{seed}", "gen2")["teacher_test_acc"] == \
            summary(out / f"seed-{seed}", "gen1")["student_test_acc"]
        assert tomllib.loads((out / f"seed-{seed}" / "gen2" / "config.toml").read_text())["seed"] == seed
    assert "gen1 (baseline)" in result.output


PARADIGMS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs" / "paradigms").glob("*.toml")
                   if is_pipeline_file(p))


def test_the_shipped_chains_plan_as_their_papers_describe(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    assert {"configs/paradigms/teacher_assistant.toml", "configs/paradigms/born_again.toml"} <= set(PARADIGMS)
    ta = {s.name: s for s in plan_pipeline("configs/paradigms/teacher_assistant.toml", out=tmp_path / "ta").stages}
    assert [ta[n].arch for n in ("assistant", "student", "direct")] == ["small_cnn", "seed_cnn", "seed_cnn"]
    assert ta["assistant"].config.teacher.arch == ta["direct"].config.teacher.arch == "resnet18"
    assert ta["student"].config.teacher.checkpoint == (tmp_path / "ta" / "assistant" / AS_TEACHER).as_posix()
    assert ta["student"].config.teacher.options == ta["assistant"].config.student.options
    ban = plan_pipeline("configs/paradigms/born_again.toml", out=tmp_path / "ban").stages
    assert [s.name for s in ban] == ["gen1", "gen2", "gen3", "gen3-ensemble"] and {s.arch for s in ban} == {"seed_cnn"}
    assert not ban[0].needs_teacher and [s.sources for s in ban[1:]] == [["gen1"], ["gen2"], ["gen1", "gen2"]]
    assert all(s.config.train == ban[0].config.train for s in ban)  # the same budget in every generation


@pytest.mark.parametrize("name", PARADIGMS)
def test_every_stage_of_a_shipped_pipeline_builds(name, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    stages = plan_pipeline(name, out=tmp_path).stages
    assert len(stages) >= 2 and all(s.status == "fresh" and s.objective.weights for s in stages)


def test_the_docs_example_is_a_valid_pipeline(monkeypatch, tmp_path):
    docs = (ROOT / "docs" / "paradigms.md").read_text()
    section = docs.split("## Chains and stages", 1)[1]
    example = re.search(r"```toml\n(.*?)```", section, flags=re.S).group(1)
    (tmp_path / "chain.toml").write_text(example)
    monkeypatch.chdir(tmp_path)
    stages = plan_pipeline("chain.toml").stages
    assert [(s.name, s.arch, s.from_stage) for s in stages] == [("assistant", "small_cnn", None),
                                                                ("student", "seed_cnn", "assistant")]
    assert stages[1].config.teacher.checkpoint == "runs/chain/assistant/as_teacher.pt"


def test_a_teacher_checkpoint_an_earlier_teacher_stage_writes_is_not_missing(tmp_path):
    shared = (tmp_path / "fitted" / "teacher.pt").as_posix()
    stages = [{"name": "t", "kind": "teacher", "teacher": {"checkpoint": shared}},
              {"name": "s", "kind": "distill", "teacher": {"checkpoint": shared, "fit_if_missing": False}}]
    path = tmp_path / "p.toml"
    path.write_text(pipeline_text(tmp_path, stages))
    planned = plan_pipeline(path, out=tmp_path / "out").stages
    assert [p.status for p in planned] == ["fresh", "fresh"] and planned[1].config.teacher.checkpoint == shared
    assert not (tmp_path / "out").exists()


def test_a_stage_learns_from_the_ensemble_of_earlier_stages(chain):
    """Born-again's ensemble teacher: a fourth stage with [teachers.<name>] from_stage = 'a' and 'b' reuses the
    finished chain (skipped) and distils from the mixture of the two students."""
    path, out, _ = chain
    extra = stage_text({"name": "ens", "kind": "distill",
                        "teachers": {"a": {"from_stage": "a"}, "b": {"from_stage": "b"}}})
    ens_path = path.with_name("chain_ens.toml")
    ens_path.write_text(path.read_text() + "\n" + extra + "\n")
    result = invoke("distill", "--config", ens_path, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    s = summary(out, "ens")
    assert set(s["teachers"]) == {"a", "b"}
    assert s["teachers"]["a"]["test_acc"] == pytest.approx(summary(out, "a")["student_test_acc"])
    assert s["teachers"]["b"]["checkpoint"] == str(out / "b" / AS_TEACHER)
    rows = {r["stage"]: r for r in json.loads((out / PIPELINE_JSON).read_text())["stages"]}
    assert rows["ens"]["teacher"]["stage"] == "a, b" and rows["a"]["skipped"]
