"""Reliability III (issue 23): the commands added since the second review keep its promises.

Every error a user can cause is one ``error:`` line, exit code 2, no traceback and nothing written; a
refusal leaves the run or sweep directory byte for byte as it was. One section per kind of the review:
sweep refusals, unbounded counts and sizes, duplicate grid values, export, damaged exported files, loss
terms, transfer-set batches, torchrun timeouts.
"""

from __future__ import annotations

import pytest

from tests.test_errors import assert_clean_failure
from tests.test_reliability import run, snapshot


# --- 1. sweep: every refusal distill makes, before the first write -----------------------------------------


@pytest.fixture
def finished_sweep(tiny_config, tmp_path):
    """A finished one-epoch sweep of one logit student (its teacher fitted on the way) -> (config, sweep dir)."""
    cfg, out = tiny_config("logit"), tmp_path / "sweep"
    result = run("sweep", "--config", cfg, "--out", out, "--quiet", "--seeds", "1", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    return cfg, out


def test_refused_sweeps_leave_the_sweep_directory_byte_for_byte(finished_sweep, tmp_path):
    cfg, out = finished_sweep
    before = snapshot(out)
    refusals = [
        (["--set", "train.epochs=1"], ["already holds a sweep"]),
        (["--set", "train.epochs=1", "--set", "distill.alpha=0.5", "--resume"], ["another config or grid"]),
        (["--set", "train.epochs=1", "--set", "data.batch_size=1000", "--resume"], ["fewer than one batch"]),
        (["--set", "train.epochs=1", "--set", f'teacher.checkpoint="{(tmp_path / "none.pt").as_posix()}"',
          "--set", "teacher.fit_if_missing=false", "--resume"], ["does not exist"]),
        (["--set", "train.epochs=1", "--set", 'distill.method="feature"', "--set", 'distill.student_features=["nope"]',
          "--set", 'distill.teacher_features=["block2"]', "--resume"], ["nope"]),
        (["--set", "train.epochs=1", "--set", 'data.transfer="unlabeled"', "--resume"], ["no unlabeled images"]),
    ]
    for extra, phrases in refusals:
        assert_clean_failure(run("sweep", "--config", cfg, "--out", out, "--quiet", "--seeds", "1", *extra), *phrases)
        assert snapshot(out) == before, extra


def test_refused_sweeps_create_nothing(tiny_config, tmp_path):
    cfg = tiny_config("none")
    fresh = tmp_path / "fresh"
    # a batch larger than the data used to "finish" after zero steps and report accuracies
    assert_clean_failure(run("sweep", "--config", cfg, "--out", fresh, "--seeds", "2", "--set", "data.batch_size=1000"),
                         "fewer than one batch", "data.batch_size")
    logit = tiny_config("logit", name="logit.toml")
    missing = f'teacher.checkpoint="{(tmp_path / "none.pt").as_posix()}"'
    assert_clean_failure(run("sweep", "--config", logit, "--out", fresh, "--set", missing,
                             "--set", "teacher.fit_if_missing=false"), "does not exist")
    inside = f'teacher.checkpoint="{(fresh / "teacher.pt").as_posix()}"'
    assert_clean_failure(run("sweep", "--config", logit, "--out", fresh, "--set", inside), "is in the run directory")
    # a refusal of the teacher fit comes before the sweep's first write, as in distill
    assert_clean_failure(run("sweep", "--config", logit, "--out", fresh, "--set", 'teacher.weights="imagenet"'),
                         "teacher.mode = 'scratch'")
    assert not fresh.exists() and not (tmp_path / "teacher").exists()


# --- 2. unbounded counts and sizes: one quick line, no large allocation first ------------------------------


def test_huge_seed_counts_are_refused_before_any_config_is_built(tiny_config, tmp_path):
    cfg, out = tiny_config("none"), tmp_path / "sweep"
    for seeds in ("1" + "0" * 30, "1000000000", ",".join(map(str, range(5000)))):
        assert_clean_failure(run("sweep", "--config", cfg, "--out", out, "--seeds", seeds),
                             "a sweep trains at most 4096", "fewer seeds")
    assert_clean_failure(run("sweep", "--config", cfg, "--out", out, "--seeds", "100",
                             "--grid", "distill.temperature=" + ",".join(str(t) for t in range(1, 51))),
                         "makes 5000 students")
    assert not out.exists()


def test_deep_nesting_and_deep_keys_are_one_line(tiny_config, tmp_path):
    cfg = tiny_config("none")
    deep_files = {
        "arrays.toml": "x = " + "[" * 3000 + "]" * 3000 + "\n",  # tomllib's parser recurses
        "tables.toml": "[" + ".".join(["a"] * 3000) + "]\nb = 1\n",  # parsed, but every walk recurses
        "inline.toml": "x = " + "{a = " * 20 + "1" + "}" * 20 + "\n",
    }
    for name, text in deep_files.items():
        (tmp_path / name).write_text(text)
        assert_clean_failure(run("config", "--config", tmp_path / name), f"'{tmp_path / name}'", "more than 16 deep")
    key = "distill.terms.ce." + ".".join(["a"] * 3000)
    result = run("config", "--config", cfg, "--set", f"{key}=1")
    assert_clean_failure(result, "a key of 3003 parts", "at most 16 deep")
    assert len(result.output) < 300  # the key is not echoed whole
    assert_clean_failure(run("config", "--config", cfg, "--set", "distill.student_features=" + "[" * 3000 + "]" * 3000),
                         "--set distill.student_features nests", "more than 16 deep")
    assert_clean_failure(run("sweep", "--config", cfg, "--out", tmp_path / "s",
                             "--grid", "distill.student_features=" + "[" * 3000 + "]" * 3000), "--grid", "more than 16 deep")


def test_paths_too_long_for_the_file_system_are_one_line_before_anything_is_written(tiny_config, tmp_path):
    cfg, out = tiny_config("logit"), tmp_path / "run"
    long_name = "a" * 300
    for key, value in [("data.root", long_name), ("teacher.checkpoint", f"{tmp_path.as_posix()}/{long_name}/t.pt"),
                       ("teacher.cache_dir", f"{tmp_path.as_posix()}/{long_name}"), ("name", long_name),
                       ("data.root", "x/" * 2100)]:
        result = run("distill", "--config", cfg, "--out", out, "--set", f'{key}="{value}"', "--set", 'teacher.cache="disk"')
        assert_clean_failure(result, key, "over the file system's limit", "shorten")
        assert len(result.output.splitlines()[-1]) < 300
    terms = tiny_config("terms", name="terms.toml", extra=f'imports = ["{long_name}.py"]\n[distill.terms.ce]\nweight = 1.0')
    assert_clean_failure(run("distill", "--config", terms, "--out", out), "distill.imports", "shorten the path")
    # paths given on the command line
    assert_clean_failure(run("distill", "--config", cfg, "--out", tmp_path / long_name), "too long for the file system")
    assert_clean_failure(run("distill", "--config", tmp_path / f"{long_name}.toml"), "too long for the file system")
    assert_clean_failure(run("evaluate", tmp_path / long_name), "too long for the file system")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["terms.toml", "tiny.toml"]


# --- 3. duplicate grid values --------------------------------------------------------------------------------


def test_a_grid_value_listed_twice_is_refused(tiny_config, tmp_path):
    cfg, out = tiny_config("logit"), tmp_path / "sweep"
    for values, phrase in (("2,4,2", "lists 2 twice"), ("2,2.0", "lists 2 and 2.0, the same value")):
        assert_clean_failure(run("sweep", "--config", cfg, "--out", out, "--seeds", "1",
                                 "--grid", f"distill.temperature={values}"), phrase, "give each value once")
    assert_clean_failure(run("sweep", "--config", cfg, "--out", out, "--grid", 'student.arch=small_cnn,"small_cnn"'),
                         'lists "small_cnn" twice')
    assert not out.exists()


# --- 7. transfer-set batches -----------------------------------------------------------------------------------


def test_labeled_share_needs_a_batch_that_holds_both_kinds(tiny_config, tmp_path):
    cfg, out = tiny_config("logit"), tmp_path / "run"
    share = ["--set", "data.transfer=unlabeled", "--set", "data.label_fraction=0.5", "--set", "data.labeled_share=0.5"]
    for command in ("distill", "sweep"):
        assert_clean_failure(run(command, "--config", cfg, "--out", out, *share, "--set", "data.batch_size=1"),
                             "data.labeled_share = 0.5", "data.batch_size >= 2 (got 1)")
    assert_clean_failure(run("sweep", "--config", cfg, "--out", out, *share, "--grid", "data.batch_size=1,16"),
                         "data.batch_size >= 2")
    assert not out.exists() and not (tmp_path / "teacher").exists()


# --- 6. loss terms from configs and user files -------------------------------------------------------------

R3_TERMS = '''
import attrs
import torch

from fkd.terms import Term, register_term


@register_term("r3_per_example")
@attrs.frozen
class PerExample(Term):
    consumes = frozenset({"student_logits"})

    def apply(self, params, state, inputs):
        return inputs.student_logits.pow(2).mean(dim=1), state  # (B,): forgot to reduce over the batch


@register_term("r3_integer")
@attrs.frozen
class Integer(Term):
    consumes = frozenset({"student_logits"})

    def apply(self, params, state, inputs):
        return inputs.student_logits.argmax(dim=1).sum(), state


@register_term("r3_no_state")
@attrs.frozen
class NoState(Term):
    consumes = frozenset({"student_logits"})

    def apply(self, params, state, inputs):
        return inputs.student_logits.pow(2).mean()


@register_term("r3_raises")
@attrs.frozen
class Raises(Term):
    consumes = frozenset({"student_logits"})

    def apply(self, params, state, inputs):
        return inputs.student_logits @ torch.ones(3), state


@register_term("r3_nan")
@attrs.frozen
class NotANumber(Term):
    consumes = frozenset({"student_logits"})

    def apply(self, params, state, inputs):
        return inputs.student_logits.mean() * float("nan"), state


@register_term("r3_sqrt_at_zero")
@attrs.frozen
class SqrtAtZero(Term):
    consumes = frozenset({"student_logits"})

    def apply(self, params, state, inputs):
        return (inputs.student_logits * 0).sqrt().mean(), state  # 0, but its gradient is 0 * inf = NaN
'''


@pytest.fixture(scope="module")
def r3_terms(tmp_path_factory):
    path = tmp_path_factory.mktemp("r3") / "r3_terms.py"  # imported once per process: one file for the module
    path.write_text(R3_TERMS)
    return path


def with_term(tiny_config, terms_file, name: str):
    return tiny_config("terms", extra=f'imports = ["{terms_file.as_posix()}"]\n[distill.terms.ce]\nweight = 1.0\n'
                                      f"[distill.terms.{name}]\nweight = 0.5\n")


def test_a_term_weight_must_be_finite(tiny_config, tmp_path):
    cfg = tiny_config("terms", extra="[distill.terms.ce]\nweight = 1.0")
    for weight in ("inf", "nan", "1e999"):
        assert_clean_failure(run("distill", "--config", cfg, "--out", tmp_path / "run",
                                 "--set", f"distill.terms.ce.weight={weight}"), "distill.terms.ce.weight", "finite")
    assert_clean_failure(run("sweep", "--config", cfg, "--out", tmp_path / "run", "--grid",
                             "distill.terms.ce.weight=1,inf"), "finite")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("term, phrases", [
    ("r3_per_example", ["'r3_per_example' loss term must return (loss, new_state) with a 0-d floating-point loss",
                        "a tensor of shape (8,) and dtype float32 and its state", ".mean()"]),
    ("r3_integer", ["'r3_integer' loss term", "a tensor of shape () and dtype int64"]),
    ("r3_no_state", ["'r3_no_state' loss term", "it returned a tensor of shape () and dtype float32;"]),
    ("r3_raises", ["the 'r3_raises' loss term failed on a test batch of 8 before training: RuntimeError"]),
])
def test_a_terms_output_is_checked_on_a_test_batch_before_anything_is_written(tiny_config, r3_terms, tmp_path,
                                                                               term, phrases):
    cfg = with_term(tiny_config, r3_terms, term)
    for command in ("distill", "sweep"):
        assert_clean_failure(run(command, "--config", cfg, "--out", tmp_path / "run", "--quiet"), *phrases)
    assert not (tmp_path / "run").exists()


def test_a_user_file_that_exits_while_imported_is_one_line(tiny_config, tmp_path):
    exits = tmp_path / "exits.py"
    exits.write_text("import sys\nsys.exit(3)\n")
    multiline = tmp_path / "multiline.py"
    multiline.write_text("raise ValueError('first line\\nsecond line')\n")
    for path, phrase in ((exits, "it called sys.exit(3) while being imported"),
                         (multiline, "ValueError: first line.")):
        cfg = tiny_config("terms", extra=f'imports = ["{path.as_posix()}"]\n[distill.terms.ce]\nweight = 1.0')
        result = run("distill", "--config", cfg, "--out", tmp_path / "run")
        assert_clean_failure(result, f"importing '{path.as_posix()}'", phrase)
        assert "second line" not in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("term, phrases", [
    ("r3_nan", ["The 'r3_nan' loss term became non-finite while the others stayed finite", "its settings"]),
    ("r3_sqrt_at_zero", ["The loss stayed finite but its gradients did not"]),
])
def test_the_non_finite_message_says_what_became_non_finite(tiny_config, r3_terms, tmp_path, term, phrases):
    result = run("distill", "--config", with_term(tiny_config, r3_terms, term), "--out", tmp_path / "run", "--quiet")
    assert_clean_failure(result, "non-finite (NaN or inf) at epoch 1, step 1", *phrases)


# --- 5. damaged exported files ---------------------------------------------------------------------------------


def test_a_damaged_pt2_file_is_one_line_without_torchs_logged_traceback(tmp_path):
    import zipfile

    damaged = tmp_path / "damaged.pt2"
    with zipfile.ZipFile(damaged, "w") as z:  # a zip, as a .pt2 is, without the archive's records
        z.writestr("archive/data.pkl", b"garbage")
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(b"PK\x03\x04 cut short")
    for path in (damaged, truncated):
        result = run("evaluate", path, "--config", "configs/baseline.toml")
        assert_clean_failure(result, f"'{path}' could not be read as an exported pt2 model")
        assert "deserializing" not in result.output and "warnings above" not in result.output
        assert len(result.output.splitlines()) == 1, result.output


# --- 4. export: export.json fkd did not write, replacing a file, a file without its entry ----------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A one-epoch student run (no teacher) to export, made once for the module."""
    from tests.conftest import tiny_config_text

    root = tmp_path_factory.mktemp("export")
    config = root / "tiny.toml"
    config.write_text(tiny_config_text(root, "none", train={"epochs": 1}))
    result = run("distill", "--config", config, "--out", root / "run", "--quiet")
    assert result.exit_code == 0, result.output
    return root / "run"


def export(run_dir, out, *extra):
    return run("export", run_dir, "--format", "pt2", "--out", out, "--latency-repeats", "0", *extra)


@pytest.mark.parametrize("report", ["[1, 2]", '{"notes": "someone else\'s"}', '{"student.pt2": {"size": 3}}',
                                    "{not json", b"\xff\xfe", "FOLDER"])
def test_an_export_json_fkd_did_not_write_is_refused_before_any_work(tiny_run, tmp_path, report):
    target = tmp_path / "student.pt2"
    if report == "FOLDER":
        (tmp_path / "export.json").mkdir()
    elif isinstance(report, bytes):
        (tmp_path / "export.json").write_bytes(report)
    else:
        (tmp_path / "export.json").write_text(report)
    before = snapshot(tmp_path)
    assert_clean_failure(export(tiny_run, target), "export.json' is not an export report written by fkd export",
                         "--out")
    assert snapshot(tmp_path) == before and not target.exists()


def test_replacing_an_exported_file_takes_overwrite_and_is_reported(tiny_run, tmp_path):
    target = tmp_path / "student.pt2"
    first = export(tiny_run, target)
    assert first.exit_code == 0, first.output
    before = snapshot(tmp_path)
    assert_clean_failure(export(tiny_run, target), "already exists", "--overwrite")
    assert snapshot(tmp_path) == before
    again = export(tiny_run, target, "--overwrite")
    assert again.exit_code == 0, again.output
    assert f"replacing {target} (--overwrite)" in again.output


def test_a_file_is_never_left_without_its_export_json_entry(tiny_run, tmp_path, monkeypatch):
    import fkd.export.report
    from fkd.errors import WriteError

    def disk_full(path, text):
        raise WriteError(f"could not write '{path}' (No space left on device); free disk space.")

    target = tmp_path / "student.pt2"
    monkeypatch.setattr(fkd.export.report, "write_text_atomic", disk_full)
    assert_clean_failure(export(tiny_run, target), "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no file without an entry, no temporary files
    monkeypatch.undo()
    assert export(tiny_run, target).exit_code == 0
    before = snapshot(tmp_path)
    monkeypatch.setattr(fkd.export.report, "write_text_atomic", disk_full)
    assert_clean_failure(export(tiny_run, target, "--overwrite"), "No space left on device")
    assert snapshot(tmp_path) == before  # the previous file, with its entry


# --- 8. torchrun: a peer that stops responding ---------------------------------------------------------------


def test_a_frozen_peer_ends_the_job_with_the_one_line_timeout(tiny_config, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from tests.test_distributed import CHILD, ROOT

    cfg = tiny_config("none", train={"epochs": 1, "log_every": 1})
    logs = tmp_path / "logs"
    logs.mkdir()
    # rank 1 sleeps 8 s before its 2nd step; rank 0 waits in that step's all-reduce and times out after 3 s
    jobs = [{"name": "frozen", "args": ["distill", "--config", str(cfg), "--out", str(tmp_path / "run"), "--quiet"],
             "freeze": "1:2"}]
    (logs / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "FKD_COLLECTIVE_TIMEOUT_S": "3",
           "FKD_TEST_FREEZE_S": "8"}
    launch = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(CHILD), "--jobs", str(logs / "jobs.json")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert launch.returncode != 0
    errs = [(logs / f"frozen.rank{r}.err").read_text() if (logs / f"frozen.rank{r}.err").exists() else ""
            for r in (0, 1)]
    assert all("Traceback" not in e and "Timed out waiting" not in e for e in errs), errs
    # one line for the job: rank 0's, which waited for the frozen rank (on a busy machine a slow start can
    # make rank 1 the one that waits first: then its line, with its number)
    lines = [line for e in errs for line in e.splitlines()]
    assert len(lines) == 1 and "a collective operation timed out after 3 s (FKD_COLLECTIVE_TIMEOUT_S)" in lines[0], errs
    assert lines[0].startswith("error: ") or lines[0].startswith("error (rank 1): "), errs
    assert "Timed out waiting" not in launch.stderr, launch.stderr[-3000:]  # torchrun's own report only
