"""Your own models and weights (docs/own_models.md): state dict files (.pth / .pt / .safetensors) for a named
architecture, strict matching with a replaced classifier head, a key prefix stripped; your own nn.Module
registered from a distill.imports file or named as module:Name, trained from the CLI on digits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fkd.build import load_config
from fkd.errors import CheckpointError
from fkd.models import MODELS, build_model
from fkd.models.from_config import build_student
from fkd.models.weight_files import read_state_dict
from tests.test_errors import assert_clean_failure, run

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
TEACHER = {"arch": "small_cnn", "widths": [8, 16]}


def _state(arch="small_cnn", classes=10, seed=3, **options):
    _, params, buffers = build_model(arch, classes, 16, seed=seed, **options)
    return {**params, **buffers}


@pytest.fixture
def registry_restored():
    saved = dict(MODELS._entries)
    yield
    MODELS._entries.clear()
    MODELS._entries.update(saved)


def test_a_pth_file_wrapped_and_prefixed_loads_exactly(tmp_path):
    state = _state(widths=[4, 8])
    path = tmp_path / "student.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 7}, path)
    assert set(read_state_dict(path, prefix="module.")) == set(state)
    cfg = load_config(None, ["data.name=digits", "data.image_size=16", "student.arch=small_cnn",
                             "student.widths=[4, 8]", f"student.weights='{path.as_posix()}'",
                             "student.weights_prefix='module.'"])
    _, params, buffers = build_student(cfg, 10)
    assert all(torch.equal(params[k], state[k]) for k in params)
    assert all(torch.equal(buffers[k], state[k]) for k in buffers)
    with pytest.raises(CheckpointError, match="student.weights_prefix = 'model.' starts none of the keys"):
        build_student(load_config(None, [f"student.weights='{path.as_posix()}'", "student.weights_prefix='model.'",
                                         "student.arch=small_cnn", "student.widths=[4, 8]"]), 10)


def test_a_safetensors_head_of_another_size_is_replaced_with_one_note(tmp_path):
    state = _state(classes=1000, widths=[4, 8])
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    notes = []
    cfg = load_config(None, ["student.arch=small_cnn", "student.widths=[4, 8]", f"student.weights='{path.as_posix()}'"])
    _, params, _ = build_student(cfg, 10, echo=notes.append)
    assert params["fc.weight"].shape == (10, 8)  # a new head
    assert all(torch.equal(params[k], state[k]) for k in params if not k.startswith("fc."))
    assert len(notes) == 1 and "classifier head 'fc' of 1000 outputs, not 10" in notes[0], notes


def test_teacher_weights_from_a_file_distill_from_the_cli(tiny_config, tmp_path):
    # a "fine-tuned" teacher saved as a plain state dict (10 digit classes): used as it is, no fit
    torch.save(_state(**{k: v for k, v in TEACHER.items() if k != "arch"}), tmp_path / "teacher.pth")
    config = tiny_config("logit", dataset="digits", teacher={**TEACHER, "checkpoint": "", "fit_if_missing": False,
                                                            "weights": (tmp_path / "teacher.pth").as_posix()},
                         train={"epochs": 1})
    result = run("distill", "--config", config, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "loaded from" in result.output and "teacher.pth" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 <= summary["teacher_test_acc"] <= 1.0  # measured, since a state dict records none

    # a 1000-class head: fitted by `fkd teacher` as teacher.mode says (linear probe), with one note line
    torch.save(_state(classes=1000, widths=[8, 16]), tmp_path / "imagenet_like.pt")
    config = tiny_config("logit", dataset="digits", name="fit.toml",
                         teacher={**TEACHER, "mode": "linear_probe", "weights": (tmp_path / "imagenet_like.pt").as_posix(),
                                  "checkpoint": (tmp_path / "fitted" / "teacher.pt").as_posix(),
                                  "train": {"epochs": 1}})
    result = run("teacher", "--config", config, "--out", tmp_path / "fitted", "--quiet")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "1000 outputs, not 10" in notes[0] and "linear_probe" in notes[0], result.output

    # the same file used as the teacher itself cannot predict 10 classes: one line, the way out named
    config = tiny_config("logit", dataset="digits", name="asis.toml",
                         teacher={**TEACHER, "checkpoint": "", "weights": (tmp_path / "imagenet_like.pt").as_posix()})
    assert_clean_failure(run("distill", "--config", config, "--out", tmp_path / "r2"),
                         "'fc.weight' (1000, 16) in the file, (10, 16) in the model", "teacher.fit_if_missing")


def test_a_file_of_another_architecture_is_one_line_naming_keys(tiny_config, tmp_path):
    torch.save({f"module.{k}": v for k, v in _state("seed_cnn").items()}, tmp_path / "other.pth")
    config = tiny_config("none", dataset="digits", student={"weights": (tmp_path / "other.pth").as_posix()})
    result = run("distill", "--config", config, "--out", tmp_path / "run")
    assert_clean_failure(result, "student.weights", "does not fit", "missing 'blocks.0.0.weight'",
                         "unexpected 'module.block1.0.weight'", "set student.weights_prefix = 'module.'")
    assert not (tmp_path / "run").exists()
    assert_clean_failure(run("distill", "--config", config, "--out", tmp_path / "run", "--set",
                             "student.weights='nope.safetensors'"), "'nope.safetensors' is not a file")
    assert_clean_failure(run("distill", "--config", config, "--set", "student.weights='w.bin'"),
                         "student.weights must be 'none' or 'imagenet' or 'pretrained' or the path of a .pth")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert_clean_failure(run("distill", "--config", config, "--out", tmp_path / "run", "--set",
                             f"student.weights='{(tmp_path / 'junk.pt').as_posix()}'"), "weights_only=True")


def test_safetensors_without_the_package_names_the_extra(tmp_path, monkeypatch):
    save_file({"w": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails as if not installed
    with pytest.raises(Exception, match=r"fkd\[safetensors\]"):
        read_state_dict(tmp_path / "w.safetensors")


def test_your_own_module_from_an_imports_file_trains_with_features(tiny_config, tmp_path, registry_restored):
    example = (EXAMPLES / "my_model.py").as_posix()
    config = tiny_config("feature", dataset="digits", extra=f'imports = ["{example}"]',
                         student={"arch": "tiny_net", "widths": None, "width": 8},
                         distill={"student_features": ["stage2"], "teacher_features": ["block2"]})
    result = run("distill", "--config", config, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    written = (tmp_path / "run" / "config.toml").read_text()
    assert 'arch = "tiny_net"' in written and "width = 8" in written and "dropout = 0.0" in written
    evaluated = run("evaluate", tmp_path / "run", "--device", "cpu")  # its config imports the file again
    assert evaluated.exit_code == 0, evaluated.output
    assert_clean_failure(run("distill", "--config", config, "--out", tmp_path / "r2", "--set",
                             "distill.student_features=['stage9']"), "'stage9'", "stage1", "embedding")
    keys = run("config", "--keys", "--config", config)
    row = next(line for line in keys.output.splitlines() if line.startswith("student.width "))
    assert "channels of the first stage" in row and "tiny_net" in row


def test_module_colon_name_trains_from_the_cli(tiny_config, tmp_path, monkeypatch, registry_restored):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    config = tiny_config("logit", dataset="digits", student={"arch": "my_model:TinyNet", "widths": None, "width": 4},
                         train={"epochs": 1})
    result = run("distill", "--config", config, "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 0, result.output
    assert "width = 4" in (tmp_path / "run" / "config.toml").read_text()
    evaluated = run("evaluate", tmp_path / "run", "--device", "cpu")
    assert evaluated.exit_code == 0, evaluated.output
    assert_clean_failure(run("distill", "--config", config, "--set", "student.arch='my_model:Nope'"),
                         "module 'my_model' has no attribute 'Nope'")
    assert_clean_failure(run("distill", "--config", config, "--set", "student.arch='no_such_mod:Net'"),
                         "module 'no_such_mod' cannot be found")
    assert_clean_failure(run("distill", "--config", config, "--set", "student.widht=3"),
                         "unknown key 'student.widht'", "did you mean 'width'?")
