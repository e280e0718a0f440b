"""Config files parse into frozen, validated attrs classes; overrides are type-checked."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import attrs
import pytest

from fkd.config import Config, ConfigError, apply_overrides, dumps, from_dict, parse_override
from fkd.build import help_text, load_config
from fkd.objective import from_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("[!_]*.toml"))  # _*.toml: bases to extend


def test_configs_exist():
    names = {p.relative_to(p.parents[1] if p.parent.name in ("stl10", "cifar10", "bench") else p.parent).as_posix()
             for p in CONFIGS}
    for required in ("teacher.toml", "baseline.toml", "logit.toml", "feature.toml", "attention.toml",
                     "stl10/teacher.toml", "stl10/logit.toml", "stl10/feature.toml",
                     "cifar10/teacher.toml", "cifar10/logit.toml", "cifar10/feature.toml"):
        assert required in names, required


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name if p.parent.name == "configs" else f"{p.parent.name}/{p.name}")
def test_every_shipped_config_parses_and_round_trips(path, tmp_path):
    from fkd.stages import is_pipeline_file, plan_pipeline

    # a pipeline ([[stages]]): each stage's config, as the pipeline builds it
    configs = [s.config for s in plan_pipeline(path, out=tmp_path).stages] if is_pipeline_file(path) else [load_config(path)]
    for cfg in configs:
        assert from_dict(tomllib.loads(dumps(cfg))) == cfg


def test_quickstart_configs_are_offline_digits():
    for name in ("teacher", "baseline", "logit", "feature", "attention"):
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml")
        assert cfg.data.name == "digits" and cfg.teacher.weights == "none"
        if name != "teacher":
            assert cfg.teacher.fit_if_missing


def test_stl10_config_is_the_notebooks_experiment():
    root = Path(__file__).resolve().parents[1] / "configs" / "stl10"
    teacher = load_config(root / "teacher.toml").teacher
    assert (teacher.arch, teacher.weights, teacher.mode) == ("resnet18", "imagenet", "linear_probe")
    opt = teacher.train.optimizer
    assert (opt.name, opt.learning_rate, opt.momentum, teacher.train.epochs) == ("sgd", 1e-3, 0.9, 5)
    logit = load_config(root / "logit.toml")
    assert (logit.data.name, logit.data.image_size, logit.data.resize, logit.data.batch_size) == ("stl10", 224, 256, 64)
    assert (logit.student.arch, logit.train.epochs, logit.train.optimizer.name, logit.train.optimizer.learning_rate) == (
        "seed_cnn", 10, "adam", 1e-3)
    # the preset is expanded when the config is read: [distill.terms] is the one form past loading
    assert (logit.distill.method, logit.distill.preset) == ("terms", "logit")
    assert logit.distill.terms == {"ce": {"weight": 1.0 - 0.7}, "logit": {"weight": 0.7, "temperature": 2.0}}
    feature = load_config(root / "feature.toml").distill
    assert feature.teacher_features == ["layer1"] and from_config(feature).weights == {"ce": 0.7, "feature": 0.3}


def test_configs_are_frozen():
    cfg = Config()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


def test_overrides_parse_toml_values_and_fall_back_to_strings():
    assert parse_override("train.epochs=3") == (["train", "epochs"], 3)
    assert parse_override("distill.weights={ce = 0.5, logit = 0.5}") == (["distill", "weights"], {"ce": 0.5, "logit": 0.5})
    assert parse_override("student.arch=resnet18") == (["student", "arch"], "resnet18")
    assert parse_override('distill.student_features=["block1"]') == (["distill", "student_features"], ["block1"])


def test_overrides_apply_to_a_copy_and_are_checked():
    raw = {"train": {"epochs": 2}}
    out = apply_overrides(raw, ["train.epochs=5", "train.optimizer.learning_rate=0.1"])
    assert raw == {"train": {"epochs": 2}}
    assert from_dict(out).train.epochs == 5 and from_dict(out).train.optimizer.learning_rate == 0.1
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):  # an option table: checked on load
        load_config(None, ["train.optimizer.learning_rat=1"])
    with pytest.raises(ConfigError, match="not a table"):
        apply_overrides({}, ["train.epochs.x=1"])


def test_integers_are_accepted_for_floats_but_not_bools_for_ints():
    assert load_config(None, ["distill.temperature=4"]).distill.terms["logit"]["temperature"] == 4.0
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config(None, ["train.epochs=true"])


@pytest.mark.parametrize("overrides, message", [
    (['distill.method="combined"'], "needs [distill.weights]"),
    (['distill.method="combined"', "distill.weights={ce = 1, kd = 1}"], "unknown loss term 'kd'"),
    (['distill.method="feature"'], "set distill.student_features"),
    (["data.resize=16", "data.image_size=32"], "data.resize = 16 is smaller"),
    (["student.widths=[]"], "student.widths must be a non-empty list"),
    (["train.optimizer.milestones=[0]"], "milestones must be a list of positive epoch numbers"),
])
def test_cross_field_validation(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_help_text_lists_the_registered_names():
    meaning = {key: text for key, _, text in help_text()}
    assert meaning["data.name"].endswith(": digits | synthetic | cifar10 | cifar100 | stl10 | imagefolder")
    assert meaning["train.optimizer.name"].endswith(": sgd | adam | adamw")
    assert meaning["teacher.train.optimizer.schedule"].endswith(
        ": constant | cosine | warmup_cosine | multistep | one_cycle")


def test_reading_the_config_module_imports_neither_torch_nor_torchvision():
    code = "import sys, fkd.config; print('torch' in sys.modules, 'torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_help_text_covers_every_key():
    keys = {row[0] for row in help_text()}
    assert {"data.batch_size", "train.optimizer.learning_rate", "teacher.train.epochs", "distill.temperature"} <= keys
    assert all(row[2] for row in help_text()), "every key documents itself"


@pytest.mark.parametrize("overrides, message", [
    (["name=\"sgd\"", "momentum=1.5"], "train.optimizer.momentum must be within [0, 1] (got 1.5)."),
    (["name=\"sgd\"", "momentum=-1"], "train.optimizer.momentum must be within [0, 1] (got -1.0)."),
    (["name=\"adam\"", "b2=2"], "train.optimizer.b2 must be within [0, 1] (got 2.0)."),
    (["name=\"adam\"", "eps=-1"], "train.optimizer.eps must be >= 0"),
    (["name=\"sgd\"", "weight_decay=-1"], "train.optimizer.weight_decay must be >= 0"),
    (["schedule=\"multistep\"", "gamma=0"], "train.optimizer.gamma must be > 0 (got 0.0)."),
    (["schedule=\"warmup_cosine\"", "warmup_epochs=-1"], "train.optimizer.warmup_epochs must be >= 0 (got -1.0)."),
    (["schedule=\"warmup_cosine\"", "warmup_epochs=9"], "train.optimizer.warmup_epochs = 9.0 covers the whole run"),
])
def test_optimizer_and_schedule_options_are_range_checked_at_load(overrides, message):
    # The builders own their options' ranges; their messages name the config key.
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"train.optimizer.{o}" for o in overrides] + ["train.epochs=3"])
    assert str(info.value).startswith(message), str(info.value)
