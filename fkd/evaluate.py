"""``fkd evaluate PATH``: accuracy, per-class accuracy, size and CPU latency of a trained model.

PATH is a run directory (its ``checkpoints/latest.pt`` and ``config.toml``; for a teacher run, its
``teacher.pt`` when present) or a checkpoint file (teacher or student; the config inside it says which
data to evaluate on).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import attrs
import torch

from fkd.checkpoint import load_checkpoint
from fkd.config import apply_overrides, from_dict, read_toml
from fkd.data import load_data
from fkd.errors import CheckpointError
from fkd.models import build_model, param_count, size_bytes
from fkd.rundir import ensure_writable, write_text_atomic
from fkd.training import cpu_latency_ms, evaluate_model


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a run directory or file path."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "teacher.pt", path / "checkpoints" / "latest.pt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"'{path}' holds no checkpoint (checkpoints/latest.pt or teacher.pt); "
                              "pass a run directory written by fkd or a checkpoint file.")
    if not path.exists():
        raise CheckpointError(f"'{path}' does not exist; pass a run directory or a checkpoint file.")
    return path


def _weights(data: dict) -> tuple[dict, dict]:
    if data["kind"] == "teacher":
        return data["params"], data["buffers"]
    state = data["state"]
    return {**state["frozen"], **state["params"]["model"]}, state["buffers"]


def evaluate_path(path: str | Path, device: torch.device, *, config_path: str | Path | None = None,
                  overrides: list[str] = (), seed: int | None = None) -> dict:
    """Evaluate the model saved at ``path`` on the test split of its config.

    The config is the one saved in the checkpoint, or ``config_path``; ``overrides`` (``key=value``)
    apply on top, e.g. ``data.root=...`` when the data moved.
    """
    ckpt = resolve_checkpoint(path)
    data = load_checkpoint(ckpt)
    if data.get("kind") not in ("teacher", "student_run", "teacher_run"):
        raise CheckpointError(f"'{ckpt}' is a {data.get('kind')} file, not a model checkpoint.")
    raw = read_toml(config_path) if config_path is not None else tomllib.loads(data["config"])
    cfg = from_dict(apply_overrides(raw, list(overrides)))
    if seed is not None:
        cfg = attrs.evolve(cfg, seed=seed)
    spec = data["model"] if "model" in data else None
    if spec is None:  # a teacher run's latest.pt: the teacher architecture of its config
        t = cfg.teacher
        spec = {"arch": t.arch, "num_classes": None, "image_size": cfg.data.image_size, "widths": t.widths,
                "batch_norm": t.batch_norm}
    bundle = load_data(cfg.data, device=device, seed=cfg.seed)
    num_classes = spec["num_classes"] or bundle.num_classes
    model, _, _ = build_model(spec["arch"], num_classes, cfg.data.image_size, widths=spec["widths"],
                              batch_norm=spec["batch_norm"])
    params, buffers = _weights(data)
    params = {k: v.to(device) for k, v in params.items()}
    buffers = {k: v.to(device) for k, v in buffers.items()}
    result = evaluate_model(model, params, buffers, bundle.test, batch_size=cfg.data.eval_batch_size,
                            num_classes=num_classes, device=device)
    return {
        "checkpoint": str(ckpt),
        "arch": spec["arch"],
        "data": cfg.data.name,
        "test_acc": result["accuracy"],
        "per_class_acc": dict(zip(bundle.class_names, result["per_class"])),
        "test_images": result["count"],
        "params": param_count(params),
        "size_bytes": size_bytes(params, buffers),
        "cpu_latency_ms": cpu_latency_ms(model, params, buffers, cfg.data.image_size),
    }


def write_report(result: dict, out: str | Path) -> Path:
    """Write an evaluation report to ``out/evaluation.json`` (atomically); returns its path."""
    out = Path(out)
    ensure_writable(out, what="the report folder", fix="pick another with --out")
    path = out / "evaluation.json"
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    return path
