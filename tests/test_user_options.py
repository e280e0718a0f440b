"""A component's options are its builder's keyword parameters: a user's optimizer, model or data set with
an option fkd has never seen is one file, named in ``distill.imports``, and needs no edit anywhere else."""

from __future__ import annotations

import json

import pytest

from tests.test_errors import assert_clean_failure, run
from fkd.checkpoint import load_checkpoint
from fkd.data.datasets import DATASETS
from fkd.models import MODELS
from fkd.optim import OPTIMIZERS, hyperparams

USER_FILE = '''
import torch

from fkd.data.datasets import DATASETS, Split, Splits, TensorViews, synthetic_images
from fkd.models import MODELS
from fkd.models.students import SmallCNN
from fkd.optim import OPTIMIZERS, sgd


@OPTIMIZERS.register("heavy_ball_sgd")
def heavy_ball_sgd(learning_rate, heavy_ball: float = 0.5):
    """SGD whose momentum is called the heavy ball (Polyak 1964).

    Args:
        heavy_ball: weight of the previous step in the next one
    """
    return sgd(learning_rate, momentum=heavy_ball)


@MODELS.register("test_wide_cnn")
def wide_cnn(num_classes: int, image_size: int, *, width_factor: int = 1):
    """A SmallCNN whose widths are (4, 8) times ``width_factor``.

    Args:
        width_factor: multiplies every block's channels
    """
    return SmallCNN(num_classes, (4 * width_factor, 8 * width_factor), True)


@DATASETS.register("test_colours")
def colours(cfg, view_size: int, *, colour_count: int = 3):
    """64 noisy images per split, one mean colour per class.

    Args:
        colour_count: number of classes, one colour each
    """
    generator = torch.Generator().manual_seed(0)
    palette = torch.randint(-80, 81, (colour_count, 3), generator=generator).float()
    splits = []
    for _ in ("train", "test"):
        views, labels = synthetic_images(64, colour_count, view_size, generator, palette)
        splits.append(Split(TensorViews(views, labels), labels))
    return Splits(train=splits[0], test=splits[1], class_names=[str(k) for k in range(colour_count)],
                  identity={"source": "test_colours", "classes": colour_count})
'''


@pytest.fixture
def user_config(tiny_config, tmp_path):
    """A tiny baseline config (no teacher) importing the user's file; the registries are restored after."""
    saved = {reg: dict(reg._entries) for reg in (OPTIMIZERS, MODELS, DATASETS)}
    (tmp_path / "my_parts.py").write_text(USER_FILE)
    path = tiny_config("none", extra=f'imports = ["{(tmp_path / "my_parts.py").as_posix()}"]')
    yield path
    for reg, entries in saved.items():
        reg._entries.clear()
        reg._entries.update(entries)


def test_a_user_optimizer_with_a_new_option_trains(user_config, tmp_path):
    text = user_config.read_text()
    student_opt = '[train.optimizer]\nname = "adam"'
    assert text.count(student_opt) == 1
    user_config.write_text(text.replace(student_opt, '[train.optimizer]\nname = "heavy_ball_sgd"\nheavy_ball = 0.3'))
    out = tmp_path / "run"
    result = run("distill", "--config", user_config, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["method"] == "none"
    assert 'name = "heavy_ball_sgd"\nlearning_rate = 0.01' in (out / "config.toml").read_text()
    assert "heavy_ball = 0.3" in (out / "config.toml").read_text()  # the run's config is complete
    # its new option is a 0-d tensor in the optimizer state (fkd.optim.inject_hyperparams), as sgd's momentum is
    opt_state = load_checkpoint(out / "checkpoints" / "latest.pt", "student_run")["state"]["opt_state"]
    held = hyperparams(opt_state)
    assert held["heavy_ball"].ndim == 0 and float(held["heavy_ball"]) == pytest.approx(0.3)
    assert float(held["learning_rate"]["value"]) == pytest.approx(0.01)  # the constant schedule's number
    sweep = run("sweep", "--config", user_config, "--out", tmp_path / "sweep", "--quiet", "--seeds", "1",
                "--grid", "train.optimizer.heavy_ball=0.1,0.3")
    assert sweep.exit_code == 0, sweep.output
    assert "1 group of 2 students" in sweep.output  # a sweep over it is one group

    assert_clean_failure(run("distill", "--config", user_config, "--out", tmp_path / "r2", "--set",
                             "train.optimizer.heavy_bal=0.3"),
                         "unknown key 'train.optimizer.heavy_bal'", "did you mean 'heavy_ball'?")
    assert_clean_failure(run("distill", "--config", user_config, "--out", tmp_path / "r3", "--set",
                             "train.optimizer.momentum=0.9"),
                         "train.optimizer.momentum = 0.9 has no effect on optimizer 'heavy_ball_sgd', "
                         "which takes heavy_ball; remove the key or pick sgd.")
    assert_clean_failure(run("distill", "--config", user_config, "--out", tmp_path / "r4", "--set",
                             "train.optimizer.heavy_ball=true"), "train.optimizer.heavy_ball must be a number")
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()

    keys = run("config", "--keys", "--config", user_config)
    assert keys.exit_code == 0, keys.output
    row = next(line for line in keys.output.splitlines() if line.startswith("train.optimizer.heavy_ball "))
    assert "weight of the previous step in the next one" in row and "heavy_ball_sgd" in row and "0.5" in row


def test_a_user_model_with_a_new_option_trains(user_config, tmp_path):
    out = tmp_path / "run"
    result = run("distill", "--config", user_config, "--out", out, "--quiet",
                 "--set", 'student.arch="test_wide_cnn"', "--set", "student.width_factor=2")
    assert result.exit_code == 0, result.output
    assert "width_factor = 2" in (out / "config.toml").read_text()
    assert "widths" not in (out / "config.toml").read_text().split("[student]")[1].split("[")[0]
    assert_clean_failure(run("distill", "--config", user_config, "--out", tmp_path / "r2",
                             "--set", 'student.arch="test_wide_cnn"', "--set", "student.width_facter=2"),
                         "unknown key 'student.width_facter'", "did you mean 'width_factor'?")


def test_a_user_data_set_with_a_new_option_trains(user_config, tmp_path):
    out = tmp_path / "run"
    result = run("distill", "--config", user_config, "--out", out, "--quiet",
                 "--set", 'data.name="test_colours"', "--set", "data.colour_count=5")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert "colour_count = 5" in (out / "config.toml").read_text()
    assert "synthetic_size" not in (out / "config.toml").read_text()  # synthetic's option: not this data set's
    assert summary["method"] == "none"
    assert_clean_failure(run("distill", "--config", user_config, "--out", tmp_path / "r2",
                             "--set", 'data.name="test_colours"', "--set", "data.colour_cout=5"),
                         "unknown key 'data.colour_cout'", "did you mean 'colour_count'?")
