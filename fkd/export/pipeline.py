"""``fkd export``: a trained model to a verified deployment file plus its report.

Steps (:func:`export_model`): read the model (:mod:`fkd.export.saved_model`); export the fp32
classifier (:mod:`fkd.export.module`, normalisation built in) into a temporary folder beside the
target; load it back in its own runtime and check its logits against fkd's on a test batch
(:mod:`fkd.export.verify`); with ``quantize="int8"``, quantize it (:mod:`fkd.export.quantize`); measure
its test accuracy and, unless ``latency_repeats == 0``, the CPU latency of fkd's model, the file and the
teacher (:mod:`fkd.export.latency`); only then move the file into place atomically and write its
``export.json`` entry (:mod:`fkd.export.report`). A failed check raises ExportError and leaves nothing
behind (a file already at the target is untouched). An existing file is replaced only with ``overwrite``,
an ``export.json`` fkd did not write is never rewritten (both refused before any work), and a file is
never left without its entry.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import attrs
import torch

from fkd import latency
from fkd.atomic import atomic_write
from fkd.data import load_data
from fkd.errors import ConfigError
from fkd.export import onnx_format
from fkd.export.exported_file import format_module, load_exported
from fkd.export.input_spec import InputSpec
from fkd.export.latency import latency_table, timed_runner
from fkd.export.module import ExportableClassifier
from fkd.export.quantize import CALIBRATION_IMAGES, SCHEMES, quantize_onnx_int8
from fkd.export.report import file_metadata, read_entries, write_entry
from fkd.export.saved_model import SavedModel, load_saved_model
from fkd.export.verify import ATOL, RTOL, check_logits, fkd_logits, split_accuracy
from fkd.models.from_config import build_teacher
from fkd.rundir import ensure_writable

VERIFY_IMAGES = 64
EXAMPLE_BATCH = 2  # tracing example: 2 keeps the batch dimension from being specialised to 1
INT8_METHOD = ("onnxruntime quantize_static, QDQ: int8 weights per output channel (7-bit range, reduce_range), "
               "uint8 activations per tensor, MinMax calibration")


def default_output(saved: SavedModel, fmt: str, quantize: str | None) -> Path:
    """``<run>/export/<role>[-int8].<suffix>`` (a saved sweep student keeps its own file stem)."""
    suffix = format_module(fmt).SUFFIX
    return saved.run_dir / "export" / f"{saved.default_stem}{'-' + quantize if quantize else ''}{suffix}"


def check_request(fmt: str, quantize: str | None, out: Path | None) -> None:
    """Refuse an impossible request before any work: unknown format or scheme, int8 pt2, wrong suffix,
    ONNX without the ``[export]`` extra."""
    module = format_module(fmt)
    if quantize is not None and quantize not in SCHEMES:
        raise ConfigError(f"--quantize {quantize} is not supported; use {' or '.join(SCHEMES)}.")
    if quantize is not None and fmt != "onnx":
        raise ConfigError("--quantize int8 is done by onnxruntime and needs --format onnx (a .pt2 file stays "
                          "fp32; docs/export.md says why).")
    if out is not None and out.suffix.lower() != module.SUFFIX:
        raise ConfigError(f"--out '{out}' must end in {module.SUFFIX} for --format {fmt}.")
    if fmt == "onnx":
        onnx_format.require()


def check_target(out: Path, overwrite: bool) -> None:
    """The file to write: not a folder, replaced only with ``overwrite``, and beside an ``export.json`` that
    fkd wrote (or none). Checked before any work."""
    if out.is_dir():
        raise ConfigError(f"--out '{out}' is a folder; give the file to write, e.g. {out / 'student.pt2'}.")
    if out.exists() and not overwrite:
        raise ConfigError(f"'{out}' already exists; pass --overwrite to replace it, or choose another file with "
                          "--out.")
    read_entries(out.parent)


def export_model(path: str | Path, *, fmt: str, quantize: str | None = None, out: str | Path | None = None,
                 teacher: bool = False, latency_repeats: int = 50, latency_threads: int = latency.DEFAULT_THREADS,
                 overwrite: bool = False,
                 echo: Callable[[str], None] = lambda message: None) -> dict:
    """Export the model at ``path`` to ``out`` (default :func:`default_output`); returns its export.json entry
    (with ``"file"`` and ``"report"`` paths added).

    ``fmt``: ``"pt2"`` or ``"onnx"``; ``quantize``: None or ``"int8"`` (ONNX only); ``teacher``: export the
    teacher instead of a student (for comparison); ``latency_repeats``: timed calls per latency figure
    (0: not measured); ``latency_threads``: the CPU threads they are timed with; ``overwrite``: replace an
    existing file at ``out`` (else refused). Runs on the CPU.
    The file and its ``export.json`` entry are written together: when the entry cannot be written, the
    file at ``out`` is put back as it was.

    Raises:
        CheckpointError / ConfigError / DataError: bad input, before anything is written.
        ExportError: the exported file does not compute fkd's logits (nothing is written).
    """
    out = Path(out) if out is not None else None
    check_request(fmt, quantize, out)
    saved = load_saved_model(path, teacher=teacher)
    out = out if out is not None else default_output(saved, fmt, quantize)
    check_target(out, overwrite)
    writer = format_module(fmt)
    cfg = saved.config
    data = load_data(attrs.evolve(cfg.data, normalize="none"), device="cpu")  # exported files normalise
    if data.num_classes != saved.model.num_classes:
        raise ConfigError(f"'{saved.checkpoint}' predicts {saved.model.num_classes} classes but its data set "
                          f"'{cfg.data.name}' has {data.num_classes}; the checkpoint and its config disagree.")
    spec = InputSpec.for_data(cfg.data)
    quantization = None if quantize is None else {"scheme": quantize, "method": INT8_METHOD,
                                                  "calibration_images": CALIBRATION_IMAGES}
    metadata = file_metadata(saved, spec, data.class_names, quantization)
    module = ExportableClassifier(saved.model, saved.params, saved.buffers, spec)
    threads = torch.get_num_threads()
    x_check = next(data.test.batches(VERIFY_IMAGES, shuffle=False))[0]
    reference = fkd_logits(saved, x_check)

    ensure_writable(out.parent, what="the export folder", fix="pick another file with --out")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        fp32_file = Path(tmp) / f"fp32{writer.SUFFIX}"
        echo(f"exporting {saved.role} {saved.model.arch} ({saved.checkpoint}) to {fmt}")
        writer.write(module, spec.example(EXAMPLE_BATCH), fp32_file, {**metadata, "quantization": None})
        run, _ = load_exported(fp32_file, threads)
        worst = check_logits(run, reference, x_check, f"the exported {fmt} file")
        echo(f"  verified: logits match fkd's within {ATOL:g} + {RTOL:g} x |logit| on {len(x_check)} test images "
             f"(max difference {worst:.2g})")
        final_file = fp32_file
        if quantize is not None:
            final_file = Path(tmp) / f"{quantize}{writer.SUFFIX}"
            echo(f"  quantizing to {quantize} (calibration: {CALIBRATION_IMAGES} training images)")
            quantize_onnx_int8(fp32_file, final_file, calibration_batches(data.train, CALIBRATION_IMAGES, cfg.seed))
            onnx_format.set_metadata(final_file, metadata)
            run, _ = load_exported(final_file, threads)
        batch = cfg.data.eval_batch_size
        accuracy = split_accuracy(run, data.test, batch_size=batch, num_classes=data.num_classes)
        fkd_accuracy = split_accuracy(lambda x: fkd_logits(saved, x), data.test, batch_size=batch,
                                      num_classes=data.num_classes)
        echo(f"  test accuracy {accuracy['accuracy']:.2%} (fkd's model: {fkd_accuracy['accuracy']:.2%}) over "
             f"{accuracy['count']} images")
        timing = None
        if latency_repeats > 0:
            echo(f"  timing on the CPU ({latency_threads} thread{'s' if latency_threads != 1 else ''}, "
                 f"median of {latency_repeats} calls)")
            timing = _latencies(saved, module, timed_runner(final_file, run, latency_threads), spec,
                                data.num_classes, latency_repeats, latency_threads)
        entry = {  # measured on final_file: the bytes that go to out
            "format": fmt,
            "quantization": quantization,
            "role": saved.role,
            "arch": saved.model.arch,
            "checkpoint": str(saved.checkpoint),
            "data": cfg.data.name,
            "input": spec.as_dict(),
            "opset": onnx_format.opset_of(final_file) if fmt == "onnx" else None,
            "file_size_bytes": final_file.stat().st_size,
            "params": metadata["params"],
            "verification": {
                "fp32_images": len(x_check), "max_abs_logit_diff": worst, "atol": ATOL, "rtol": RTOL,
                "int8": "accuracy over the whole test set (test_acc)" if quantize else None,
            },
            "test_acc": accuracy["accuracy"],
            "fkd_test_acc": fkd_accuracy["accuracy"],
            "test_images": accuracy["count"],
            "latency_ms_per_image": timing,
            "versions": _versions(fmt),
        }
        report = _write_with_entry(out, final_file, entry, Path(tmp), echo)
    return {**entry, "file": str(out), "report": str(report)}


def _write_with_entry(out: Path, final_file: Path, entry: dict, tmp: Path, echo: Callable[[str], None]) -> Path:
    """Move the exported file to ``out`` and write its export.json entry; if the entry cannot be written,
    ``out`` is put back as it was (the previous file, or none), so a file never lacks its entry."""
    previous = tmp / "previous"
    if out.exists():
        echo(f"  replacing {out} (--overwrite)")
        try:
            os.link(out, previous)  # the old file stays reachable until the entry is written
        except OSError:  # a file system without hard links
            shutil.copy2(out, previous)
    atomic_write(out, lambda f: _copy_into(final_file, f))
    try:
        return write_entry(out, entry)
    except BaseException:
        if previous.exists():
            os.replace(previous, out)
        else:
            out.unlink(missing_ok=True)
        raise


def calibration_batches(source, images: int, seed: int, batch_size: int = 64):
    """The first ``images`` training images in a seeded shuffled order, unaugmented, as model inputs."""
    seen = 0
    for x, _, _ in source.batches(batch_size, shuffle=True, seed=seed, augment=False):
        if seen >= images:
            return
        x = x[: images - seen]
        seen += len(x)
        yield x


def _latencies(saved: SavedModel, module: ExportableClassifier, run, spec: InputSpec, num_classes: int,
               repeats: int, threads: int) -> dict:
    """Per-image CPU latency (ms) at batch 1 and 64 of fkd's model (``module``: ``Model.apply`` eager, the
    normalisation included as in the file), the exported file (``run``) and the teacher."""
    table = {
        "threads": threads,
        "repeats": repeats,
        "fkd": latency_table(module, spec, repeats=repeats, threads=threads),
        "exported": latency_table(run, spec, repeats=repeats, threads=threads),
    }
    if saved.role == "teacher":
        table["teacher"] = {"arch": saved.model.arch, "note": "this file is the teacher: as fkd", **table["fkd"]}
        return _with_load(table)
    # Latency depends on the architecture, not the weights: the teacher's is measured on its architecture
    # freshly built, so it is known even where the teacher checkpoint is not at hand.
    model, params, buffers = build_teacher(saved.config, num_classes)
    teacher = ExportableClassifier(model, params, buffers, spec)
    table["teacher"] = {"arch": model.arch, "note": "fkd's model, eager (the architecture of teacher.arch)",
                        **latency_table(teacher, spec, repeats=repeats, threads=threads)}
    return _with_load(table)


def _with_load(table: dict) -> dict:
    """``table`` with the machine's load when the timing ended, and ``busy`` when it exceeded the cores."""
    load_1min, cores = latency.machine_load()
    return {**table, "load_1min": load_1min, "cores": cores, "busy": load_1min is not None and load_1min > cores}


def _copy_into(source: Path, f) -> None:
    with source.open("rb") as src:
        shutil.copyfileobj(src, f)


def _versions(fmt: str) -> dict:
    versions = {"torch": torch.__version__}
    if fmt == "onnx":
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    return versions
