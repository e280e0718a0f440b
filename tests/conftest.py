"""Shared fixtures: tiny configs on synthetic data so every command runs in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


TINY = """
name = "tiny"
seed = 0
device = "cpu"

[data]
name = "synthetic"
image_size = 16
synthetic_size = 96
synthetic_classes = 4
batch_size = 16
eval_batch_size = 64

[teacher]
arch = "small_cnn"
widths = [8, 16]
weights = "none"
mode = "scratch"
checkpoint = "{root}/teacher/teacher.pt"
fit_if_missing = true

[teacher.train]
epochs = 2
log_every = 2

[teacher.train.optimizer]
name = "adam"
learning_rate = 1e-2

[student]
arch = "small_cnn"
widths = [4, 8]

[train]
epochs = 2
log_every = 2

[train.optimizer]
name = "adam"
learning_rate = 1e-2

[distill]
method = "{method}"
student_features = {s_feats}
teacher_features = {t_feats}
{extra}
"""


def tiny_config_text(root: Path, method: str = "logit", extra: str = "") -> str:
    feats = method in ("feature", "attention", "combined")
    return TINY.format(
        root=root.as_posix(), method=method, extra=extra,
        s_feats='["block2"]' if feats else "[]", t_feats='["block2"]' if feats else "[]",
    )


@pytest.fixture
def tiny_config(tmp_path):
    """``make(method="logit", extra="") -> Path`` of a tiny config file under tmp_path."""

    def make(method: str = "logit", extra: str = "", name: str = "tiny.toml") -> Path:
        path = tmp_path / name
        path.write_text(tiny_config_text(tmp_path, method, extra))
        return path

    return make


@pytest.fixture
def one_thread():
    """One torch thread for the test: nothing in it is timed, and two OpenMP threads on a busy
    two-core machine can run 100x slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_torch_home(tmp_path_factory, monkeypatch):
    # torchvision's weight cache points into a temp folder: tests never see (or fill) the user's cache.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch_home"))
    torch.manual_seed(0)


def wrap_distill_step(monkeypatch, before_call):
    """Make ``fkd distill``'s step call ``before_call(n, batch)`` before its n-th call (n from 1).

    ``before_call`` may return a replacement batch (or None to keep it).
    """
    import fkd.run_setup

    real = fkd.run_setup.make_train_step

    def wrapped(*args, **kwargs):
        step = real(*args, **kwargs)
        calls = {"n": 0}

        def counting(state, batch, *rest):
            calls["n"] += 1
            replaced = before_call(calls["n"], batch)
            return step(state, batch if replaced is None else replaced, *rest)

        return counting

    monkeypatch.setattr(fkd.run_setup, "make_train_step", wrapped)
