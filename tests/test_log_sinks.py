"""``[log]``: TensorBoard event files (read back with tensorboard's EventAccumulator) for a distillation and a
sweep's HParams, W&B through a stand-in module, and no import of either package unless a config asks."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import attrs
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fkd.build import load_config
from fkd.config import LogConfig, dumps
from fkd.run_start import config_key
from tests.test_errors import assert_clean_failure, run

ROOT = Path(__file__).resolve().parents[1]


def _events(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path))
    acc.Reload()
    return acc


def test_a_distillation_writes_tensorboard_events(tiny_config, tmp_path):
    config = tiny_config("logit", dataset="digits", log={"tensorboard": True},
                         train={"epochs": 1, "log_every": 40})
    result = run("distill", "--config", config, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    # resumed for a second epoch: the curves go on from the checkpoint's step, nothing doubled or lost
    result = run("distill", "--config", config, "--out", tmp_path / "run", "--quiet", "--resume",
                 "--set", "train.epochs=2")
    assert result.exit_code == 0, result.output
    events = _events(tmp_path / "run" / "tensorboard")
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/ce", "train/logit", "train/grad_norm", "train/acc", "train/lr",
                "epoch/test_acc", "epoch/train_acc", "epoch/train_loss", "epoch/images_per_s"):
        assert tag in tags, (tag, tags)
    per_epoch = 1437 // 16  # digits' 1,437 training images in batches of 16
    assert [e.step for e in events.Scalars("train/loss")] == [40, 80, per_epoch, per_epoch + 40, per_epoch + 80,
                                                              2 * per_epoch]
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([0.01] * 6)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("epoch/test_acc")] == pytest.approx([m["test_acc"] for m in metrics])
    assert [e.step for e in events.Scalars("epoch/test_acc")] == [per_epoch, 2 * per_epoch]
    assert "config/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "[distill.terms.logit]" in text and "tensorboard = true" in text


def test_a_sweep_logs_each_students_hyperparameters_and_final_metrics(tiny_config, tmp_path):
    config = tiny_config("logit", dataset="digits", log={"tensorboard": True}, train={"epochs": 1, "log_every": 50})
    result = run("sweep", "--config", config, "--out", tmp_path / "sweep", "--quiet", "--seeds", "1",
                 "--grid", "distill.temperature=1,4")
    assert result.exit_code == 0, result.output
    finals = {s["student"]: s for s in json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())["students_final"]}
    runs = sorted(p.name for p in (tmp_path / "sweep" / "tensorboard").iterdir())
    assert runs == sorted(finals)
    for name in runs:
        events = _events(tmp_path / "sweep" / "tensorboard" / name)
        assert {"train/loss", "train/logit", "epoch/test_acc", "final/test_acc"} <= set(events.Tags()["scalars"])
        assert events.Scalars("final/test_acc")[0].value == pytest.approx(finals[name]["test_acc"])
        plugin = events.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"])
        hparams = {k: v.number_value for k, v in start.session_start_info.hparams.items()}
        assert hparams == {"distill.temperature": float(name.split("=")[1].split("_")[0]), "seed": 0.0}
        experiment = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/experiment"]).experiment
        assert "final/test_acc" in [m.name.tag for m in experiment.metric_infos]


class _FakeRun:
    def __init__(self, calls: list, **kwargs):
        self.kwargs, self.logged, self.summary, self.finished = kwargs, [], {}, False
        self.config = types.SimpleNamespace(update=lambda *a, **k: None)
        calls.append(self)

    def log(self, values, step):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def test_wandb_gets_the_same_metrics(tiny_config, tmp_path, monkeypatch):
    calls: list[_FakeRun] = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # what find_spec reports: "installed"
    fake.init = lambda **kwargs: _FakeRun(calls, **kwargs)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = tiny_config("logit", dataset="digits", log={"wandb": "offline"}, train={"epochs": 1, "log_every": 40})
    result = run("distill", "--config", config, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    student = next(c for c in calls if c.kwargs["dir"] == str(tmp_path / "run"))
    assert student.kwargs["mode"] == "offline" and student.kwargs["project"] == "fkd"
    assert student.kwargs["config"]["log"]["wandb"] == "offline"  # the resolved config
    keys = set().union(*(values for _, values in student.logged))
    assert {"train/loss", "train/logit", "train/grad_norm", "train/lr", "epoch/test_acc"} <= keys
    assert student.finished


def test_a_missing_package_is_one_line_naming_the_extra(tiny_config, tmp_path, monkeypatch):
    config = tiny_config("logit", dataset="digits")
    for module, setting, extra in (("tensorboard", "log.tensorboard=true", "fkd[tensorboard]"),
                                   ("wandb", "log.wandb=online", "fkd[wandb]")):
        monkeypatch.setitem(sys.modules, module, None)  # find_spec answers None: not installed
        assert_clean_failure(run("distill", "--config", config, "--out", tmp_path / "run", "--set", setting), extra)
        assert not (tmp_path / "run").exists()
    assert_clean_failure(run("distill", "--config", config, "--set", "log.wandb=yes"), "log.wandb must be one of")


def test_logging_settings_may_change_on_resume():
    cfg = load_config(None, [])
    logged = attrs.evolve(cfg, log=LogConfig(tensorboard=True, wandb="offline"))
    assert config_key(dumps(cfg)) == config_key(dumps(logged))
    assert config_key(dumps(cfg)) != config_key(dumps(attrs.evolve(cfg, seed=1)))


def test_nothing_imports_tensorboard_or_wandb_unless_asked(tmp_path):
    from tests.conftest import tiny_config_text

    (tmp_path / "c.toml").write_text(tiny_config_text(tmp_path, "logit", train={"epochs": 1}))
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from fkd import cli\n"
        f"r = CliRunner().invoke(cli.main, ['distill', '--config', {str(tmp_path / 'c.toml')!r}, '--out', "
        f"{str(tmp_path / 'run')!r}, '--quiet'])\n"
        "assert r.exit_code == 0, r.output\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'wandb', 'tensorboardX') "
        "or m.startswith('torch.utils.tensorboard'))\n"
        "print('IMPORTED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "IMPORTED []" in out.stdout, out.stdout
