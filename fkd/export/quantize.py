"""Post-training static int8 quantization of an exported ONNX classifier, calibrated on training images.

onnxruntime's static quantization (``onnxruntime.quantization.quantize_static``): the fp32 model is
first pre-processed (shape inference, graph optimisation: ``quant_pre_process``), then run on
calibration batches to record each activation's range (MinMax), and rewritten in QDQ form with
weights int8 per output channel and activations uint8 per tensor (U8S8, the combination onnxruntime
recommends for x86 CPUs; onnxruntime then fuses the QDQ pairs into int8 kernels). Weights use 7 bits
(``reduce_range=True``, in [-64, 64]): see :func:`quantize_onnx_int8` for why. See
https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html.

PyTorch's own path on this torch version (PT2E: ``prepare_pt2e`` / ``convert_pt2e`` with the
``X86InductorQuantizer``) lives in the separate ``torchao`` package and yields a program that runs int8
only under ``torch.compile``; fkd does not ship it (docs/export.md, "Deploying the student").
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from fkd.errors import ExportError
from fkd.export import onnx_format
from fkd.export.input_spec import INPUT_NAME

SCHEMES = ("int8",)
CALIBRATION_IMAGES = 512


def quantize_onnx_int8(fp32_path: Path, out_path: Path, calibration: Iterable[torch.Tensor]) -> None:
    """Write the int8 version of ``fp32_path`` to ``out_path``, calibrated on the batches ``calibration``
    (float32 (B, 3, S, S) model inputs; about :data:`CALIBRATION_IMAGES` images is plenty)."""
    onnx_format.require()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self, batches: Iterator[torch.Tensor]):
            self.batches = batches

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {INPUT_NAME: np.ascontiguousarray(x.numpy(), dtype=np.float32)}

    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepared))
            # reduce_range: 7-bit weights. On x86 CPUs without VNNI (AVX2 only, e.g. many AMD EPYC / older
            # Xeons) onnxruntime's u8s8 kernels multiply with vpmaddubsw, which adds each pair of u8 x s8
            # products into a *saturating* int16: 255 * 127 * 2 = 64770 > 32767, so full-range weights
            # (per channel, every channel reaches +-127) clip and the int8 file's accuracy drops (a small_cnn
            # on digits: 0.77 against 0.89 in float, while the same file with its QDQ pairs run unfused scores
            # 0.89). With weights in [-64, 64] a pair is at most 255 * 64 * 2 = 32640 and never saturates, so
            # the file computes the same on any x86 CPU, VNNI or not, at the cost of one bit of weight precision.
            quantize_static(str(prepared), str(out_path), Batches(iter(calibration)), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)
        except (RuntimeError, ValueError) as exc:
            raise ExportError(f"onnxruntime could not quantize '{fp32_path.name}' to int8 ({exc}); export it "
                              "without --quantize.") from None
