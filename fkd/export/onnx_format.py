"""``.onnx``: ``torch.onnx.export`` (the dynamo exporter) at a stated opset, run with onnxruntime.

Needs the optional extra ``[export]`` (onnx, onnxscript, onnxruntime); without it a clear error names
it. The batch dimension is dynamic (``batch``); fkd's metadata (:mod:`fkd.export.report`) is stored in
the model's ``metadata_props`` under the key ``fkd``. Loading needs only onnxruntime:
``InferenceSession(path).run(None, {"x": x})``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fkd.errors import FkdError
from fkd.export import pt2_format
from fkd.export.input_spec import INPUT_NAME, OUTPUT_NAME

SUFFIX = ".onnx"
OPSET = 18
METADATA_KEY = "fkd"
EXTRA_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def require(*packages: str) -> None:
    """Fail with one sentence naming the ``[export]`` extra when one of ``packages`` is not installed."""
    for name in packages or EXTRA_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            raise FkdError(f"ONNX export and int8 quantization need the optional extra [export] ('{name}' is not "
                           "installed); install it with: pip install -e \".[export]\" (onnx, onnxscript, "
                           "onnxruntime).") from None


def write(module: nn.Module, example: torch.Tensor, path: Path, metadata: dict) -> None:
    """Export ``module`` (``forward(x)``) traced on ``example`` to ``path`` at :data:`OPSET`, with fkd's
    ``metadata``."""
    require()
    program = pt2_format.export_program(module, example)
    onnx_program = torch.onnx.export(program, (example,), dynamo=True, input_names=[INPUT_NAME],
                                     output_names=[OUTPUT_NAME], opset_version=OPSET, verbose=False)
    onnx_program.save(str(path))
    set_metadata(path, metadata)


def set_metadata(path: Path, metadata: dict) -> None:
    """Store ``metadata`` (JSON) in the model's ``metadata_props`` under :data:`METADATA_KEY`."""
    import onnx

    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in kept}, METADATA_KEY: json.dumps(metadata)})
    onnx.save(model, str(path))


def session(path: Path, threads: int):
    """An onnxruntime CPU session on ``path`` using ``threads`` threads within an operator."""
    require("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise here
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def load(path: Path, threads: int):
    """``(run, metadata)``: ``run(x: Tensor) -> logits Tensor`` through onnxruntime, and fkd's metadata."""
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    props = sess.get_modelmeta().custom_metadata_map

    def run(x: torch.Tensor) -> torch.Tensor:
        out = sess.run(None, {name: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(out)

    return run, json.loads(props.get(METADATA_KEY, "{}"))


def input_shape(path: Path) -> list:
    """The input's shape as the file states it (the name of a dynamic dimension, e.g. ``"batch"``)."""
    sess = session(path, 1)
    return [d if isinstance(d, int) else "batch" for d in sess.get_inputs()[0].shape]


def opset_of(path: Path) -> int:
    """The default-domain opset the file was written at."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
