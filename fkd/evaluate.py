"""``fkd evaluate PATH``: accuracy, per-class accuracy, size and CPU latency of a trained model.

PATH is a run directory (its ``checkpoints/latest.pt`` and ``config.toml``; for a teacher run, its
``teacher.pt`` when present) or a checkpoint file (teacher or student; the config inside it says which
data to evaluate on).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import torch

from fkd.checkpoint import load_checkpoint
from fkd.config import from_dict
from fkd.data import load_data
from fkd.errors import CheckpointError
from fkd.models import build_model, param_count, size_bytes
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


def evaluate_path(path: str | Path, device: torch.device, *, data_overrides: dict | None = None) -> dict:
    """Evaluate the model saved at ``path`` on its config's test split."""
    ckpt = resolve_checkpoint(path)
    data = load_checkpoint(ckpt)
    if data.get("kind") not in ("teacher", "student_run", "teacher_run"):
        raise CheckpointError(f"'{ckpt}' is a {data.get('kind')} file, not a model checkpoint.")
    raw = tomllib.loads(data["config"])
    if data_overrides:
        raw.setdefault("data", {}).update(data_overrides)
    cfg = from_dict(raw)
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
