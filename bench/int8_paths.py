"""Which int8 path serves a student better on the CPU: onnxruntime's static quantization (what
``fkd export --quantize int8`` ships) or PyTorch's PT2E (``torchao``: ``prepare_pt2e`` / ``convert_pt2e``
with the ``X86InductorQuantizer``)?

    pip install torchao          # for the PT2E rows; without it they say so
    python bench/int8_paths.py RUN [--latency-repeats 50]

Both are calibrated on the same training images (:func:`fkd.export.pipeline.calibration_batches`) and
judged on the whole test set. Rows: fp32 and int8 in onnxruntime; fp32 and PT2E int8 in PyTorch, eager
and under ``torch.compile`` (inductor lowers the PT2E graph to int8 kernels; eager runs its
quantize / dequantize ops in fp32). Latency: CPU ms per image at batch 1 and 64, median of
``--latency-repeats`` calls after warm-up (the compile happens in the warm-up). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path


def compare(run: Path, *, latency_repeats: int = 50, echo=print) -> list[dict]:
    """One row per (path, runtime): ``{"path", "runtime", "test_acc", "file_size_bytes", "batch_1", "batch_64"}``."""
    import attrs
    import torch

    from fkd.data import load_data
    from fkd.export.exported_file import load_exported
    from fkd.export.input_spec import InputSpec
    from fkd.export.latency import latency_table
    from fkd.export.module import ExportableClassifier
    from fkd.export.pipeline import export_model, calibration_batches
    from fkd.export.pt2_format import batch_dynamic_shapes, export_program
    from fkd.export.quantize import CALIBRATION_IMAGES
    from fkd.export.saved_model import load_saved_model
    from fkd.export.verify import split_accuracy

    saved = load_saved_model(run)
    cfg = saved.config
    data = load_data(attrs.evolve(cfg.data, normalize="none"), device="cpu")
    spec = InputSpec.for_data(cfg.data)
    threads = torch.get_num_threads()
    rows = []

    def row(path: str, runtime: str, fn, size: int | None) -> None:
        echo(f"{path} in {runtime}")
        acc = split_accuracy(fn, data.test, batch_size=cfg.data.eval_batch_size, num_classes=data.num_classes)
        timing = latency_table(fn, spec, repeats=latency_repeats, threads=threads) if latency_repeats else {}
        rows.append({"path": path, "runtime": runtime, "test_acc": acc["accuracy"], "file_size_bytes": size, **timing})

    with tempfile.TemporaryDirectory() as tmp:
        for quantize in (None, "int8"):
            out = Path(tmp) / f"{quantize or 'fp32'}.onnx"
            export_model(run, fmt="onnx", quantize=quantize, out=out, latency_repeats=0, echo=echo)
            fn, _ = load_exported(out, threads)
            row("fp32" if quantize is None else "int8 onnxruntime static (shipped)", "onnxruntime", fn,
                out.stat().st_size)

    module = ExportableClassifier(saved.model, saved.params, saved.buffers, spec)
    example = spec.example(2)
    fp32 = export_program(module, example).module()
    row("fp32", "pytorch eager", _no_grad(fp32), _saved_size(export_program(module, example)))
    row("fp32", "pytorch compiled", _no_grad(torch.compile(fp32)), None)
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError:
        rows.append({"path": "int8 PT2E", "runtime": "torchao is not installed (pip install torchao)",
                     "test_acc": None, "file_size_bytes": None})
        return rows
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(export_program(module, example).module(), quantizer)
    with torch.no_grad():
        for x in calibration_batches(data.train, CALIBRATION_IMAGES, cfg.seed):
            prepared(x)
    int8 = convert_pt2e(prepared)
    with torch.no_grad():
        program = torch.export.export(int8, (example,), dynamic_shapes=batch_dynamic_shapes())
    row("int8 PT2E (X86InductorQuantizer)", "pytorch eager", _no_grad(int8), _saved_size(program))
    row("int8 PT2E (X86InductorQuantizer)", "pytorch compiled", _no_grad(torch.compile(int8)), None)
    return rows


def _no_grad(fn):
    import torch

    def run(x):
        with torch.no_grad():
            return fn(x)

    return run


def _saved_size(program) -> int:
    import torch

    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getbuffer().nbytes


def markdown_table(rows: list[dict]) -> str:
    lines = ["| path | runtime | test acc | file size | CPU ms/image, batch 1 | CPU ms/image, batch 64 |",
             "|---|---|---:|---:|---:|---:|"]
    fmt = lambda v, f: "n/a" if v is None else f.format(v)  # noqa: E731
    for r in rows:
        size = None if r["file_size_bytes"] is None else r["file_size_bytes"] / 1e6
        lines.append(f"| {r['path']} | {r['runtime']} | {fmt(r['test_acc'], '{:.2%}')} | {fmt(size, '{:.3f} MB')} | "
                     f"{fmt(r.get('batch_1'), '{:.3f}')} | {fmt(r.get('batch_64'), '{:.3f}')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="distill run directory or student checkpoint")
    parser.add_argument("--latency-repeats", type=int, default=50, help="timed calls per figure (0: accuracy only)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fkd.errors import FkdError

    try:
        rows = compare(args.run, latency_repeats=args.latency_repeats, echo=lambda m: print(m, file=sys.stderr))
    except FkdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
