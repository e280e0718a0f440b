"""Refusals that change nothing, faults that end in one sentence, runs that cannot escape or collide.

One section per case of the second reliability review; every refused command is checked to leave the
run directory byte for byte as it was.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fkd import cli
from fkd.atomic import atomic_write
from fkd.cache import _load, build_cache, cache_key
from fkd.checkpoint import load_checkpoint, save_checkpoint
from fkd.build import load_config
from fkd.data import load_data
from fkd.errors import DataError, WriteError
from fkd.models.from_config import build_teacher
from fkd.runlock import LOCK_NAME, RunLock
from fkd.teacher import save_teacher
from tests.conftest import wrap_distill_step
from tests.test_data import config as data_config
from tests.test_data import write_image_folder
from tests.test_errors import assert_clean_failure


def run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """Every file under ``folder`` (hidden ones too) -> its bytes; None when the folder does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.tmp")]


@pytest.fixture
def finished_run(tiny_config, tmp_path):
    """A finished one-epoch run of the logit config (its teacher fitted on the way) -> (config, run dir)."""
    cfg, out = tiny_config("logit"), tmp_path / "run"
    result = run("distill", "--config", cfg, "--out", out, "--quiet", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    return cfg, out


# --- 1. a refused command leaves the run untouched --------------------------------------------------


def test_refused_commands_leave_the_run_directory_byte_for_byte(finished_run, tmp_path):
    cfg, out = finished_run
    before = snapshot(out)
    refusals = [
        # a finished run, started again with another config, without and with --resume
        (["--set", "train.epochs=1", "--set", "distill.alpha=0.5"], ["already holds a run"]),
        (["--set", "train.epochs=1", "--set", "distill.alpha=0.5", "--resume"], ["different config"]),
        # a batch larger than the data set
        (["--set", "train.epochs=1", "--set", "data.batch_size=1000", "--resume"], ["fewer than one batch"]),
        # the teacher is missing and may not be fitted here
        (["--set", "train.epochs=1", "--set", f'teacher.checkpoint="{(tmp_path / "none.pt").as_posix()}"',
          "--set", "teacher.fit_if_missing=false", "--resume"], ["does not exist"]),
    ]
    for extra, phrases in refusals:
        assert_clean_failure(run("distill", "--config", cfg, "--out", out, "--quiet", *extra), *phrases)
        assert snapshot(out) == before, extra

    # a checkpoint of another state layout (written by another fkd version) is found before any write
    latest = out / "checkpoints" / "latest.pt"
    saved = load_checkpoint(latest, "student_run")
    saved["state"].pop("objective")
    save_checkpoint(latest, {k: v for k, v in saved.items() if k not in ("fkd", "kind")}, "student_run")
    before = snapshot(out)
    result = run("distill", "--config", cfg, "--out", out, "--quiet", "--set", "train.epochs=2", "--resume")
    assert_clean_failure(result, "another layout")
    assert snapshot(out) == before


def test_refused_commands_create_nothing(tiny_config, tmp_path):
    cfg = tiny_config("none")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_failure(run("distill", "--config", cfg, "--out", empty, "--resume"), "nothing to resume")
    assert snapshot(empty) == {}
    assert_clean_failure(run("distill", "--config", cfg, "--out", tmp_path / "a" / "b", "--resume"), "nothing to resume")
    assert_clean_failure(run("distill", "--config", cfg, "--out", tmp_path / "big", "--set", "data.batch_size=1000"),
                         "fewer than one batch", "data.batch_size")
    assert_clean_failure(run("teacher", "--config", cfg, "--out", tmp_path / "tbig", "--set", "data.batch_size=1000"),
                         "fewer than one batch")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "tiny.toml"]


def test_refused_teacher_fit_leaves_its_run_untouched(tiny_config, tmp_path):
    cfg, out = tiny_config("none"), tmp_path / "t"
    assert run("teacher", "--config", cfg, "--out", out, "--quiet", "--set", "teacher.train.epochs=1").exit_code == 0
    before, teacher_before = snapshot(out), snapshot(tmp_path / "teacher")
    result = run("teacher", "--config", cfg, "--out", out, "--quiet", "--resume",
                 "--set", "teacher.train.optimizer.learning_rate=0.5")
    assert_clean_failure(result, "different config")
    assert snapshot(out) == before and snapshot(tmp_path / "teacher") == teacher_before


# --- 2. evaluate on data that does not fit the model --------------------------------------------------


def test_evaluate_refuses_data_the_model_cannot_take(tiny_config, tmp_path):
    out = tmp_path / "seed"
    result = run("distill", "--config", tiny_config("none"), "--out", out, "--quiet", "--set", "train.epochs=1",
                 "--set", 'student.arch="seed_cnn"')  # its classifier is sized for 16 px images
    assert result.exit_code == 0, result.output
    assert_clean_failure(run("evaluate", out, "--set", "data.image_size=32"),
                         "trained on 16 px images", "data.image_size = 32", "--set data.image_size=16")
    assert_clean_failure(run("evaluate", out, "--set", "data.synthetic_classes=5"),
                         "predicts 4 classes", "has 5")
    assert_clean_failure(run("evaluate", out, "--set", "data.synthetic_classes=3"), "predicts 4 classes", "has 3")


def test_evaluate_runs_a_model_that_takes_any_image_size(finished_run):
    _, out = finished_run  # small_cnn pools globally: another image size fits
    result = run("evaluate", out, "--json", "--set", "data.image_size=24")
    assert result.exit_code == 0, result.output


def test_evaluate_a_teacher_runs_checkpoint_with_and_without_its_model_entry(tiny_config, tmp_path):
    cfg, out = tiny_config("none"), tmp_path / "t"
    assert run("teacher", "--config", cfg, "--out", out, "--quiet", "--set", "teacher.train.epochs=1").exit_code == 0
    latest = out / "checkpoints" / "latest.pt"
    good = run("evaluate", latest, "--json")
    assert good.exit_code == 0, good.output
    saved = load_checkpoint(latest, "teacher_run")
    assert saved["model"]["num_classes"] == 4
    del saved["model"]  # as written before teacher runs saved it: the class count comes from the head
    save_checkpoint(latest, {k: v for k, v in saved.items() if k not in ("fkd", "kind")}, "teacher_run")
    legacy = run("evaluate", latest, "--json")
    assert legacy.exit_code == 0, legacy.output
    assert json.loads(legacy.output)["test_acc"] == json.loads(good.output)["test_acc"]
    assert_clean_failure(run("evaluate", latest, "--set", "data.synthetic_classes=6"), "predicts 4 classes")


# --- 3. a corrupt image names the file, with and without DataLoader workers ------------------------------


@pytest.mark.parametrize("in_memory", ["auto", "never"])
def test_corrupt_image_gives_the_same_message_with_workers(tmp_path, in_memory):
    write_image_folder(tmp_path, {"train": {"cat": 3, "dog": 2}, "test": {"cat": 1, "dog": 1}})
    (tmp_path / "train" / "dog" / "1.png").write_bytes(b"not a png")
    messages = []
    for workers in (0, 2):
        with pytest.raises(DataError) as info:
            bundle = load_data(data_config(name="imagefolder", root=str(tmp_path), num_workers=workers,
                                           in_memory=in_memory))
            list(bundle.train.batches(2, shuffle=True))
        messages.append(str(info.value))
    assert messages[0] == messages[1], messages
    assert "1.png" in messages[0] and "\n" not in messages[0] and "worker" not in messages[0]


# --- 4. a torn last line in metrics.jsonl ------------------------------------------------------------------


def test_resume_drops_a_torn_metrics_line_and_says_so_once(finished_run):
    cfg, out = finished_run
    metrics = out / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"epoch": 2, "train_loss": 0.4')  # killed while appending
    result = run("distill", "--config", cfg, "--out", out, "--quiet", "--resume", "--set", "train.epochs=2")
    assert result.exit_code == 0, result.output
    assert result.output.count("dropped 1 unreadable line") == 1
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2]


# --- 5. a failing checkpoint write; temporary files of a killed write ---------------------------------------


def test_checkpoint_write_over_the_file_size_limit(finished_run):
    cfg, out = finished_run
    latest = out / "checkpoints" / "latest.pt"
    before = latest.read_bytes()
    limit = 8192  # the config and metrics fit; the checkpoint (about 24 kB) does not
    assert (out / "config.toml").stat().st_size < limit < len(before)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "fkd.cli", "distill", "--config", str(cfg), "--out", str(out), "--quiet", "--resume",
         "--set", "train.epochs=2"],
        capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(latest) in errors[0] and "File too large" in errors[0], result.stderr
    assert latest.read_bytes() == before  # the previous checkpoint, intact
    assert temporaries(out) == []
    assert not (out / LOCK_NAME).exists()


def test_failed_write_raises_one_sentence_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"w": torch.ones(3)}, kind="student_run")
    before = path.read_bytes()

    def disk_full(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match="No space left on device") as info:
        atomic_write(path, disk_full)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_new_files_get_the_usual_permissions_and_replacements_keep_theirs(tmp_path):
    umask = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.txt", lambda f: f.write(b"x"))
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    path.chmod(0o640)
    atomic_write(path, lambda f: f.write(b"y"))
    assert path.stat().st_mode & 0o777 == 0o640


def test_start_and_resume_remove_temporary_files_a_killed_write_left(finished_run, tiny_config, tmp_path):
    cfg, out = finished_run
    stale = [out / "checkpoints" / ".latest.pt.k1ll3d.tmp", out / ".config.toml.x7y8z9.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 4096)
    (out / ".my-notes.tmp").write_text("not fkd's: kept")
    result = run("distill", "--config", cfg, "--out", out, "--quiet", "--resume", "--set", "train.epochs=2")
    assert result.exit_code == 0, result.output
    assert temporaries(out) == [out / ".my-notes.tmp"]
    fresh = tmp_path / "fresh"  # a first run whose first checkpoint write was killed
    (fresh / "checkpoints").mkdir(parents=True)
    (fresh / "checkpoints" / ".latest.pt.abc.tmp").write_bytes(b"\0" * 4096)
    assert run("distill", "--config", tiny_config("none"), "--out", fresh, "--quiet").exit_code == 0
    assert temporaries(fresh) == []


# --- 6. teacher.checkpoint that is a folder -------------------------------------------------------------------


def test_teacher_checkpoint_that_is_a_folder_is_refused_before_fitting(tiny_config, tmp_path):
    folder = tmp_path / "teachers"
    folder.mkdir()
    setting = f'teacher.checkpoint="{folder.as_posix()}"'
    assert_clean_failure(run("teacher", "--config", tiny_config("none"), "--out", tmp_path / "t", "--set", setting),
                         "is a folder", "teacher.pt")
    assert_clean_failure(run("distill", "--config", tiny_config("logit"), "--out", tmp_path / "d", "--set", setting),
                         "is a folder")
    assert not (tmp_path / "t").exists() and not (tmp_path / "d").exists() and snapshot(folder) == {}


# --- 7. seeds beyond 64 bits ----------------------------------------------------------------------------------


def test_huge_seed_is_refused_and_the_largest_runs(tiny_config, tmp_path):
    cfg = tiny_config("none")
    assert_clean_failure(run("distill", "--config", cfg, "--out", tmp_path / "a", "--seed", "1" * 20),
                         "seed must fit in 64 bits", "pick a smaller seed")
    assert_clean_failure(run("distill", "--config", cfg, "--out", tmp_path / "a", "--set", f"seed={2**63}"),
                         "seed must fit in 64 bits")
    assert not (tmp_path / "a").exists()
    for seed in (2**63 - 1, -(2**63)):
        result = run("distill", "--config", cfg, "--out", tmp_path / f"s{seed}", "--seed", seed, "--quiet",
                     "--set", "train.epochs=1", "--set", "data.flip=true")
        assert result.exit_code == 0, result.output


# --- 8. run names that are paths --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../escaped", "ABSOLUTE", "a/b", "..", "", "a\\b"])
def test_run_name_must_be_a_plain_name(tiny_config, tmp_path, monkeypatch, name):
    cfg = tiny_config("none")
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    name = str(tmp_path / "escaped") if name == "ABSOLUTE" else name
    assert_clean_failure(run("distill", "--config", cfg, "--set", f"name={json.dumps(name)}"),
                         "name must be a plain name", "--out")
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["deep", "tiny.toml"]


def test_plain_run_name_goes_under_runs(tiny_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("distill", "--config", tiny_config("none"), "--quiet", "--set", 'name="v1.2_final-run"',
                 "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "v1.2_final-run" / "summary.json").is_file()


# --- 9. the printed resume command is shell-quoted ---------------------------------------------------------------


def test_printed_resume_command_runs_in_a_shell(tiny_config, tmp_path, monkeypatch):
    folder = tmp_path / "my configs"
    folder.mkdir()
    cfg = folder / "tiny one.toml"
    cfg.write_text(tiny_config("none").read_text())
    out = tmp_path / "runs dir" / "it's $HOME"

    def interrupt(n, batch):
        if n == 8:  # mid-way through epoch 2
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as m:
        wrap_distill_step(m, interrupt)
        result = run("distill", "--config", cfg, "--out", out, "--quiet", "--set", 'distill.method="none"')
    assert result.exit_code == 128 + signal.SIGINT, result.output
    command = result.output.split("Resume with: ", 1)[1].strip()
    argv = shlex.split(command)
    assert argv[:2] == ["fkd", "distill"] and str(cfg) in argv and str(out) in argv and argv[-1] == "--resume"
    assert "distill.method=\"none\"" in argv
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    resumed = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(out / "checkpoints" / "latest.pt", "student_run")["epoch"] == 2


# --- 10. two processes on one run directory; a disk cache built twice at once ------------------------------------


def test_a_run_directory_in_use_is_refused_and_a_stale_lock_is_taken_over(tiny_config, tmp_path):
    cfg, out = tiny_config("none"), tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fkd.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
         "print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(out)
        assert_clean_failure(run("distill", "--config", cfg, "--out", out, "--quiet"),
                             f"in use by process {holder.pid}", "--out")
        assert_clean_failure(run("teacher", "--config", cfg, "--out", out, "--quiet"), f"in use by process {holder.pid}")
        assert snapshot(out) == before
    finally:
        holder.kill()  # as kill -9 would: the lock file stays, the kernel's lock goes
        holder.wait()
    assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)
    result = run("distill", "--config", cfg, "--out", out, "--quiet", "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    assert not (out / LOCK_NAME).exists()


def test_lock_in_this_process_and_release_tidies_what_it_created(tmp_path):
    folder = tmp_path / "a" / "b"
    with RunLock(folder):
        assert (folder / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(Exception, match=f"in use by process {os.getpid()}"):
            RunLock(folder).acquire()
    assert not (tmp_path / "a").exists()  # nothing was written in it: the folders it made are gone again


def test_a_teacher_to_be_fitted_inside_the_run_directory_is_refused(tiny_config, tmp_path):
    out = tmp_path / "run"  # its teacher run would need the lock the distillation holds
    setting = f'teacher.checkpoint="{(out / "teacher.pt").as_posix()}"'
    assert_clean_failure(run("distill", "--config", tiny_config("logit"), "--out", out, "--set", setting),
                         "is in the run directory", "another folder")
    assert not out.exists()


def test_disk_cache_built_by_two_writers_at_once(tiny_config, tmp_path, monkeypatch):
    cfg = load_config(tiny_config("feature"))
    data = load_data(cfg.data)
    model, params, buffers = build_teacher(cfg, data.num_classes, ("block2",))
    variables = {"params": params, "buffers": buffers}
    teacher_path = tmp_path / "t.pt"
    save_teacher(teacher_path, cfg, model, params, buffers, 0.5)
    key = cache_key(teacher_path, data.fingerprint, model.feature_names, "fp32")
    cache_dir = tmp_path / "cache"
    path = cache_dir / f"teacher-{key[:32]}.pt"
    build = lambda: build_cache(model, variables, data.train, mode="disk", key=key, cache_dir=cache_dir,  # noqa: E731
                                batch_size=32, precision="fp32", device="cpu")
    real_save = torch.save
    seen = {}

    def racing_save(obj, f, *args, **kwargs):
        if not seen:  # writer A, half-way through its file: a reader and a whole writer B come in
            f.write(b"PK\x03\x04 the first half of writer A's cache")
            seen["path_while_a_writes"] = path.exists()
            seen["b"] = build()
            seen["read_while_a_writes"] = _load(path, torch.device("cpu"), len(data.train))
            f.seek(0)
            f.truncate()
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", racing_save)
    a = build()
    assert seen["path_while_a_writes"] is False  # a half-written cache is never at the path readers open
    idx = torch.arange(len(data.train))
    want = seen["b"].lookup(idx)["teacher_logits"]
    for cache in (a, seen["read_while_a_writes"], seen["b"], _load(path, torch.device("cpu"), len(data.train))):
        torch.testing.assert_close(cache.lookup(idx)["teacher_logits"], want)
    assert temporaries(cache_dir) == []
    assert load_checkpoint(path, "teacher_cache")["key"] == key


# --- 11. an existing teacher checkpoint is never replaced silently ----------------------------------------------


def test_teacher_refuses_to_replace_an_existing_teacher_checkpoint(tiny_config, tmp_path):
    cfg = tiny_config("none")
    teacher_pt = tmp_path / "teacher" / "teacher.pt"
    assert run("teacher", "--config", cfg, "--out", tmp_path / "t", "--quiet",
               "--set", "teacher.train.epochs=1").exit_code == 0
    first = teacher_pt.read_bytes()

    # another run (another --out) refuses, and writes nothing
    result = run("teacher", "--config", cfg, "--out", tmp_path / "t2", "--quiet", "--set", "teacher.train.epochs=1")
    assert_clean_failure(result, "already exists", "--overwrite")
    assert teacher_pt.read_bytes() == first and not (tmp_path / "t2").exists()

    # resuming the run that wrote it may replace it
    result = run("teacher", "--config", cfg, "--out", tmp_path / "t", "--quiet", "--resume",
                 "--set", "teacher.train.epochs=2")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(teacher_pt, "teacher") and teacher_pt.read_bytes() != first

    # --overwrite replaces it from another run; then the first run, resumed, no longer owns it
    result = run("teacher", "--config", cfg, "--out", tmp_path / "t3", "--quiet", "--overwrite",
                 "--set", "teacher.train.epochs=1", "--set", "teacher.train.optimizer.learning_rate=0.02")
    assert result.exit_code == 0, result.output
    other = teacher_pt.read_bytes()
    before = snapshot(tmp_path / "t")
    result = run("teacher", "--config", cfg, "--out", tmp_path / "t", "--quiet", "--resume",
                 "--set", "teacher.train.epochs=3")
    assert_clean_failure(result, "already exists")
    assert teacher_pt.read_bytes() == other and snapshot(tmp_path / "t") == before


# --- 12. the memory benchmark runs (its numbers are reported, not asserted) ---------------------------------------


def test_memory_benchmark_reports_rss_per_epoch(tiny_config, tmp_path):
    from fkd.clone_files import load_clone_module

    bench = load_clone_module("bench/memory.py", "the memory benchmark")
    rows = bench.measure(load_config(tiny_config("logit"), ["train.epochs=3"]), tmp_path / "bench", echo=lambda s: None)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r["rss_mb"] > 0 and r["peak_rss_mb"] >= r["rss_mb"] * 0.99 for r in rows)
