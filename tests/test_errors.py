"""Bad input: one clear sentence, exit code 2, no traceback, nothing written or damaged.
Faults: non-finite losses, atomic checkpoints, unwritable output. Security: no code runs on load."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fkd import cli
from fkd.checkpoint import load_checkpoint, save_checkpoint
from fkd.errors import CheckpointError
from tests.conftest import wrap_distill_step


def run(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def assert_clean_failure(result, *phrases):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, result.output
    for phrase in phrases:
        assert phrase in error_lines[0], (phrase, error_lines[0])


def test_missing_config_file(tmp_path):
    assert_clean_failure(run("distill", "--config", tmp_path / "nope.toml"), "does not exist")


def test_malformed_toml_says_where(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[data\nbatch_size = 3\n')
    assert_clean_failure(run("distill", "--config", bad), "not valid TOML", "line 2")


@pytest.mark.parametrize("setting, phrases", [
    ("data.batchsize=3", ["batchsize", "did you mean 'batch_size'"]),
    ("distill.temprature=3", ["did you mean 'temperature'"]),
    ("nosuch.key=1", ["no key 'nosuch'"]),
    ("distill.temperature=0", ["distill.temperature must be > 0"]),
    ("distill.temperature=-1.5", ["distill.temperature must be > 0"]),
    ("distill.alpha=1.5", ["distill.alpha must be within [0, 1]"]),
    ("train.optimizer.learning_rate=0", ["train.optimizer.learning_rate must be > 0"]),
    ("data.batch_size=0", ["data.batch_size must be >= 1"]),
    ("train.epochs=0", ["train.epochs must be >= 1"]),
    ("train.epochs=1.5", ["train.epochs must be an integer"]),
    ('student.arch="resnet81"', ["student.arch = 'resnet81' is not a known model", "resnet18"]),
    ('distill.method="fitnets"', ["distill.method = 'fitnets' is not a known distillation method", "feature", "terms"]),
    ('data.name="imagenet22k"', ["data.name = 'imagenet22k' is not a known data set", "valid: digits"]),
    ('train.optimizer.name="lion"', ["train.optimizer.name = 'lion' is not a known optimizer", "adamw"]),
    ('train.optimizer.schedule="linear"', ["train.optimizer.schedule = 'linear' is not a known schedule",
                                           "cosine"]),
    ("train.optimizer.momentum=0.9", ["train.optimizer.momentum = 0.9 has no effect on optimizer 'adam'",
                                      "which takes b1, b2, eps, weight_decay", "pick sgd"]),
    ("train.optimizer.milestones=[1]", ["train.optimizer.milestones = [1] has no effect on schedule 'constant'",
                                        "pick multistep"]),
    ("train.epochs", ["--set expects key=value"]),
])
def test_bad_settings(tiny_config, tmp_path, setting, phrases):
    out = tmp_path / "run"
    result = run("distill", "--config", tiny_config("logit"), "--out", out, "--set", setting)
    assert_clean_failure(result, *phrases)
    assert not out.exists()


def test_unknown_key_in_file_suggests_closest(tiny_config, tmp_path):
    cfg = tiny_config("logit")
    cfg.write_text(cfg.read_text().replace("batch_size = 16", "batch_sise = 16"))
    assert_clean_failure(run("distill", "--config", cfg), "data.batch_sise", "did you mean 'batch_size'")


def test_unknown_feature_lists_valid_names(tiny_config, tmp_path):
    out = tmp_path / "run"
    result = run("distill", "--config", tiny_config("feature"), "--out", out, "--set", 'distill.teacher_features=["block9"]')
    assert_clean_failure(result, "'block9'", "valid names", "block1", "block2")
    assert not out.exists() and not (tmp_path / "teacher").exists()  # found before any teacher fit


def test_unmatchable_feature_pair_says_why(tiny_config, tmp_path):
    result = run("distill", "--config", tiny_config("feature"), "--out", tmp_path / "run",
                 "--set", 'distill.student_features=["pool"]')
    assert_clean_failure(result, "cannot match", "'pool'", "spatial map")


def test_feature_lists_of_different_length(tiny_config, tmp_path):
    result = run("distill", "--config", tiny_config("feature"), "--out", tmp_path / "run",
                 "--set", 'distill.student_features=["block1", "block2"]')
    assert_clean_failure(result, "paired by position")


def test_missing_data_folder(tiny_config, tmp_path):
    cfg = tiny_config("none")
    result = run("distill", "--config", cfg, "--out", tmp_path / "run", "--set", 'data.name="imagefolder"',
                 "--set", f'data.root="{(tmp_path / "photos").as_posix()}"')
    assert_clean_failure(result, "photos")


def test_offline_torchvision_dataset(tiny_config, tmp_path):
    cfg = tiny_config("none")
    result = run("distill", "--config", cfg, "--out", tmp_path / "run", "--set", 'data.name="cifar10"',
                 "--set", "data.download=false", "--set", f'data.root="{tmp_path.as_posix()}"')
    assert_clean_failure(result, "CIFAR-10", str(tmp_path))


@pytest.fixture
def fitted_teacher(tiny_config, tmp_path):
    cfg = tiny_config("logit")
    assert run("teacher", "--config", cfg, "--out", tmp_path / "t", "--quiet").exit_code == 0
    return cfg, tmp_path / "teacher" / "teacher.pt"


def test_teacher_checkpoint_with_wrong_class_count(fitted_teacher, tmp_path):
    cfg, _ = fitted_teacher
    result = run("distill", "--config", cfg, "--out", tmp_path / "d", "--set", "data.synthetic_classes=5")
    assert_clean_failure(result, "predicts 4 classes", "has 5")


def test_teacher_checkpoint_with_wrong_architecture(fitted_teacher, tmp_path):
    cfg, _ = fitted_teacher
    result = run("distill", "--config", cfg, "--out", tmp_path / "d", "--set", 'teacher.arch="resnet18"')
    assert_clean_failure(result, "is a small_cnn", "teacher.arch")
    result = run("distill", "--config", cfg, "--out", tmp_path / "d2", "--set", "teacher.widths=[8, 32]")
    assert_clean_failure(result, "fit the teacher again")


def test_teacher_checkpoint_that_is_not_fkds(tiny_config, tmp_path):
    cfg = tiny_config("logit")
    fake = tmp_path / "teacher" / "teacher.pt"
    fake.parent.mkdir()
    torch.save({"weights": torch.ones(2)}, fake)
    assert_clean_failure(run("distill", "--config", cfg, "--out", tmp_path / "d"), "not an fkd checkpoint")
    fake.write_bytes(b"not a zip at all")
    assert_clean_failure(run("distill", "--config", cfg, "--out", tmp_path / "d"), "not a readable checkpoint")


def test_unwritable_output_fails_before_training(tiny_config, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    result = run("distill", "--config", tiny_config("none"), "--out", blocker / "run")
    assert_clean_failure(result, "cannot write to the run directory", "--out")


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_config, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def poison(n, batch):  # a NaN image at the 2nd step of epoch 2 (6 steps per epoch)
        if n == 8:
            return {**batch, "x": torch.full_like(batch["x"], float("nan"))}

    wrap_distill_step(monkeypatch, poison)
    result = run("distill", "--config", tiny_config("none"), "--out", out, "--quiet")
    assert_clean_failure(result, "non-finite", "epoch 2, step 2", "learning rate")
    saved = load_checkpoint(out / "checkpoints" / "latest.pt", "student_run")
    assert (saved["epoch"], saved["batch"]) == (1, 0)  # the last good checkpoint, from the end of epoch 1
    assert all(torch.isfinite(v).all() for v in saved["state"]["params"]["model"].values())


def test_atomic_save_keeps_previous_checkpoint_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"w": torch.ones(3)}, kind="student_run")
    before = path.read_bytes()

    def torn_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": torch.zeros(3)}, kind="student_run")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_planted_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"fkd": 1, "kind": "teacher", "payload": _Exploit()}, evil)
    assert pickle.loads  # the payload really would run under a plain pickle load
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(evil)
    assert not Path("PWNED").exists()


def test_planted_pickle_via_cli(tiny_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "teacher" / "teacher.pt"
    evil.parent.mkdir()
    torch.save({"fkd": 1, "kind": "teacher", "payload": _Exploit()}, evil)
    assert_clean_failure(run("distill", "--config", tiny_config("logit"), "--out", tmp_path / "d"), "could run code")
    assert_clean_failure(run("evaluate", evil), "could run code")
    assert not (tmp_path / "PWNED").exists()


def test_evaluate_missing_path(tmp_path):
    assert_clean_failure(run("evaluate", tmp_path / "nowhere"), "does not exist")
    assert_clean_failure(run("evaluate", tmp_path), "holds no checkpoint")


def test_config_paths_never_reach_a_shell():
    # Paths from configs are used as paths: the package never starts a shell or subprocess.
    root = Path(__file__).resolve().parents[1] / "fkd"
    for source in root.rglob("*.py"):
        text = source.read_text()
        for banned in ("os.system", "subprocess", "shell=True", "os.popen"):
            assert banned not in text, (source, banned)
