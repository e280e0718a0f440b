"""Shared fixtures: tiny configs on synthetic data so every command runs in seconds on a CPU."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

from fkd.config_files import merge_tables


def _tiny_tables(root: Path, method: str, dataset: str) -> dict:
    """The tiny config as nested dicts: small_cnn teacher and student, two epochs of Adam, 16 px images."""
    feats = ["block2"] if method in ("feature", "attention", "combined") else []
    data = {"name": "synthetic", "image_size": 16, "synthetic_size": 96, "synthetic_classes": 4,
            "batch_size": 16, "eval_batch_size": 64}
    if dataset == "digits":  # scikit-learn's bundled digits: real labels, no download
        data = {"name": "digits", "image_size": 16, "batch_size": 16, "eval_batch_size": 64}
    elif dataset != "synthetic":
        raise ValueError(f"tiny configs use dataset 'synthetic' or 'digits', not {dataset!r}")
    return {
        "name": "tiny", "seed": 0, "device": "cpu",
        "data": data,
        "teacher": {"arch": "small_cnn", "widths": [8, 16], "weights": "none", "mode": "scratch",
                    "checkpoint": f"{root.as_posix()}/teacher/teacher.pt", "fit_if_missing": True,
                    "train": {"epochs": 2, "log_every": 2, "optimizer": {"name": "adam", "learning_rate": 1e-2}}},
        "student": {"arch": "small_cnn", "widths": [4, 8]},
        "train": {"epochs": 2, "log_every": 2, "optimizer": {"name": "adam", "learning_rate": 1e-2}},
        "distill": {"method": method, "student_features": feats, "teacher_features": feats},
    }


def _drop_none(table: dict) -> dict:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in table.items() if v is not None}


def tiny_config_dict(root: Path, method: str = "logit", extra: str = "", dataset: str = "synthetic",
                     **tables) -> dict:
    """The one tiny test config, as a dict, with changes on top.

    ``root`` holds the teacher checkpoint (``root/teacher/teacher.pt``); ``method`` is ``distill.method``
    (feature methods pair ``block2`` with ``block2``); ``extra`` is TOML text read inside ``[distill]`` (it
    may open further tables); ``dataset`` is ``"synthetic"`` (96 random images, 4 classes) or ``"digits"``.
    Each keyword names a top-level key or table, e.g. ``data={"batch_size": 8}`` or ``name="dp"``, and merges
    into it deeply (as a config's ``extends`` does); a value ``None`` removes that key.
    """
    table = _tiny_tables(root, method, dataset)
    if extra:
        table = merge_tables(table, tomllib.loads("[distill]\n" + extra))
    return _drop_none(merge_tables(table, tables))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"tiny configs hold no {type(value).__name__}")


def toml_text(table: dict, prefix: str = "") -> str:
    """TOML text for a nested dict: a table's plain keys, then one ``[a.b]`` section per sub-table."""
    plain = [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    lines = [f"[{prefix}]"] + plain if prefix else plain
    for key, sub in table.items():
        if isinstance(sub, dict):
            lines += ["", toml_text(sub, f"{prefix}.{key}" if prefix else key)]
    return "\n".join(lines)


def tiny_config_text(root: Path, method: str = "logit", extra: str = "", **changes) -> str:
    """:func:`tiny_config_dict` as TOML text."""
    return toml_text(tiny_config_dict(root, method, extra, **changes)) + "\n"


@pytest.fixture
def tiny_config(tmp_path):
    """``make(method="logit", extra="", name="tiny.toml", **changes) -> Path`` of a tiny config file under
    tmp_path; ``changes`` as for :func:`tiny_config_dict`."""

    def make(method: str = "logit", extra: str = "", name: str = "tiny.toml", **changes) -> Path:
        path = tmp_path / name
        path.write_text(tiny_config_text(tmp_path, method, extra, **changes))
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
