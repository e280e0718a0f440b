"""Teacher fits (linear probe, finetune, scratch) and torchvision weight loading, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from fkd.checkpoint import load_checkpoint
from fkd.build import load_config
from fkd.data import load_data
from fkd.errors import CheckpointError, ConfigError
from fkd.models import build_model
from fkd.rundir import RunDir
from fkd.models.from_config import build_teacher
from fkd.teacher import fit_teacher, load_teacher


def _fit(tiny_config, tmp_path, *overrides):
    cfg = load_config(tiny_config("logit"), ["teacher.train.epochs=1", *overrides])
    data = load_data(cfg.data)
    summary = fit_teacher(cfg, data, torch.device("cpu"), RunDir(tmp_path / "trun"), quiet=True, echo=lambda s: None)
    saved = load_checkpoint(summary["checkpoint"], "teacher")
    return cfg, data, saved


def test_linear_probe_trains_only_the_head(tiny_config, tmp_path):
    cfg, data, saved = _fit(tiny_config, tmp_path, 'teacher.mode="linear_probe"')
    _, init_params, init_buffers = build_teacher(cfg, data.num_classes)
    changed = {k for k in init_params if not torch.equal(init_params[k], saved["params"][k])}
    assert changed == {"fc.weight", "fc.bias"}
    # the frozen backbone runs in eval mode: its BatchNorm statistics stay as they were
    for k in init_buffers:
        assert torch.equal(init_buffers[k], saved["buffers"][k]), k


def test_finetune_trains_every_weight(tiny_config, tmp_path):
    cfg, data, saved = _fit(tiny_config, tmp_path, 'teacher.mode="finetune"')
    _, init_params, _ = build_teacher(cfg, data.num_classes)
    assert all(not torch.equal(init_params[k], saved["params"][k]) for k in init_params)
    assert "opt_state" not in saved and "state" not in saved  # a teacher file holds weights only


def test_scratch_refuses_pretrained_weights(tiny_config, tmp_path):
    cfg = load_config(tiny_config("logit"), ['teacher.weights="imagenet"', 'teacher.mode="scratch"'])
    with pytest.raises(ConfigError, match="set teacher.weights = 'none'"):
        fit_teacher(cfg, load_data(cfg.data), torch.device("cpu"), RunDir(tmp_path / "r"), quiet=True)
    assert not (tmp_path / "r").exists()


def test_load_teacher_round_trip(tiny_config, tmp_path):
    cfg, data, saved = _fit(tiny_config, tmp_path)
    model, variables, acc = load_teacher(Path(cfg.teacher.checkpoint), cfg, data.num_classes, ("block1",))
    assert acc == saved["test_acc"]
    x, y, _ = next(data.test.batches(8, shuffle=False))
    logits, feats, _ = model.apply(variables["params"], variables["buffers"], x, train=False)
    assert logits.shape == (8, data.num_classes) and feats["block1"].shape[:2] == (8, 8)


def _plant_resnet18_weights(torch_home: Path) -> dict:
    """Put a state dict where torchvision looks for resnet18's ImageNet weights (no download)."""
    enum = torchvision.models.ResNet18_Weights.DEFAULT
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    target = torch_home / "hub" / "checkpoints" / enum.url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return state


def test_imagenet_weights_load_from_torchvision_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    state = _plant_resnet18_weights(tmp_path / "th")
    _, params, buffers = build_model("resnet18", 10, 32, weights="imagenet")
    for k in ("conv1.weight", "layer3.1.conv2.weight"):
        assert torch.equal(params[k], state[k])
    assert torch.equal(buffers["bn1.running_mean"], state["bn1.running_mean"])
    assert params["fc.weight"].shape == (10, 512)  # the head is resized to the data set's classes


def test_imagenet_weights_offline_and_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError) as info:
        build_model("resnet18", 10, 32, weights="imagenet")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message and "teacher.weights = 'none'" in message
