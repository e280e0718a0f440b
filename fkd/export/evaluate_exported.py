"""``fkd evaluate FILE.pt2|FILE.onnx``: an exported model on the test split of a config's data.

The file runs in its own runtime (PyTorch for ``.pt2``, onnxruntime for ``.onnx``) on the data as
exported files take them (:mod:`fkd.export.input_spec`: ``pixels / 255``, normalisation built in). The
config is ``config_path`` or, when omitted, the training config fkd stored in the file; ``overrides``
apply on top. Data the file cannot take (another image size or class count) is refused up front.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import attrs
import torch

from fkd import latency
from fkd.config import apply_overrides, from_dict, read_toml
from fkd.data import load_data
from fkd.errors import ConfigError, DataError
from fkd.export.exported_file import FORMATS, format_of, load_exported
from fkd.export.input_spec import InputSpec
from fkd.evaluate import latency_entries
from fkd.export.latency import exported_latency
from fkd.export.verify import split_accuracy

LATENCY_REPEATS = 20


def evaluate_exported(path: str | Path, *, config_path: str | Path | None = None, overrides: list[str] = (),
                      threads: int = latency.DEFAULT_THREADS) -> dict:
    """Accuracy, per-class accuracy, size and batch-1 CPU latency (``threads`` threads) of the exported file
    at ``path``.

    Returns the keys of :func:`fkd.evaluate.evaluate_path` (``checkpoint`` is the file) plus ``format``
    and ``quantization``.
    """
    path = Path(path)
    run, metadata = load_exported(path, torch.get_num_threads())  # the accuracy pass uses every core
    if config_path is not None:
        raw = read_toml(config_path)
    elif "config" in metadata:
        raw = tomllib.loads(metadata["config"])
    else:
        raise ConfigError(f"'{path}' was not written by fkd export, so it holds no config; pass --config with the "
                          "data to evaluate it on.")
    cfg = from_dict(apply_overrides(raw, list(overrides)))
    fmt = format_of(path)
    shape = FORMATS[fmt].input_shape(path)
    if len(shape) != 4 or shape[1:] != [3, cfg.data.image_size, cfg.data.image_size]:
        raise DataError(f"'{path}' takes input of shape {shape}, but data.image_size = {cfg.data.image_size} makes "
                        f"images of 3 x {cfg.data.image_size} x {cfg.data.image_size}; set data.image_size to the "
                        "file's size (--set data.image_size=...).")
    data = load_data(attrs.evolve(cfg.data, normalize="none"), device="cpu")
    num_classes = metadata.get("num_classes")
    if num_classes is None:
        num_classes = run(InputSpec.for_data(cfg.data).example(1)).shape[-1]
    if num_classes != data.num_classes:
        raise DataError(f"'{path}' predicts {num_classes} classes, but data set '{cfg.data.name}' has "
                        f"{data.num_classes}; evaluate it on the data it was trained on (--config / --set data.*).")
    result = split_accuracy(run, data.test, batch_size=cfg.data.eval_batch_size, num_classes=num_classes)
    return {
        "checkpoint": str(path),
        "format": fmt,
        "quantization": (metadata.get("quantization") or {}).get("scheme"),
        "arch": metadata.get("arch", f"exported {fmt} model"),
        "data": cfg.data.name,
        "test_acc": result["accuracy"],
        "per_class_acc": dict(zip(data.class_names, result["per_class"])),
        "test_images": result["count"],
        "params": metadata.get("params"),
        "size_bytes": path.stat().st_size,
        **latency_entries(exported_latency(path, run, InputSpec.for_data(cfg.data), 1, threads=threads,
                                           repeats=LATENCY_REPEATS)),
    }
