"""The README's deployment table: teacher vs student vs student int8, each exported and measured.

    python bench/export_table.py RUN [--format onnx] [--latency-repeats 50] [--out DIR]

RUN is a distill run directory whose config names a trained teacher (``teacher.checkpoint``), e.g.
``runs/feature`` after the quickstart. Three exports (:func:`fkd.export.pipeline.export_model`), one
after another in this process: the teacher (``--teacher``), the student, the student with
``--quantize int8``; each is verified as ``fkd export`` verifies it. The table reads their export.json
entries: test accuracy of the exported file, its size, and its CPU latency per image at batch 1 and 64 in
its own runtime (onnxruntime for ONNX), median of ``--latency-repeats`` calls. Timing is only
meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROWS = (("teacher", dict(teacher=True)), ("student", dict()), ("student int8", dict(quantize="int8")))


def export_rows(run: Path, out: Path, *, fmt: str = "onnx", latency_repeats: int = 50, threads: int = 1,
                echo=print) -> list[dict]:
    """Export the three models of the table into ``out`` and return their export.json entries, labelled
    (latency timed with ``threads`` CPU threads)."""
    from fkd.export.pipeline import export_model

    suffix = "." + fmt
    rows = []
    for label, options in ROWS:
        if options.get("quantize") and fmt != "onnx":
            continue
        target = out / (label.replace(" ", "-") + suffix)
        entry = export_model(run, fmt=fmt, out=target, latency_repeats=latency_repeats, latency_threads=threads,
                             overwrite=True, echo=echo, **options)  # the table's own files: made again on each run
        rows.append({"label": label, **entry})
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (accuracy, file size, latency per image at batch 1 and 64)."""
    lines = ["| model | file | test acc | file size | CPU ms/image, batch 1 | CPU ms/image, batch 64 |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        latency = r["latency_ms_per_image"]
        b1, b64 = ("n/a", "n/a") if latency is None else (f"{latency['exported']['batch_1']:.3f}",
                                                          f"{latency['exported']['batch_64']:.3f}")
        lines.append(f"| {r['label']} ({r['arch']}) | {Path(r['file']).name} | {r['test_acc']:.2%} | "
                     f"{r['file_size_bytes'] / 1e6:.2f} MB | {b1} | {b64} |")
    threads = next((r["latency_ms_per_image"]["threads"] for r in rows if r["latency_ms_per_image"]), None)
    if threads is not None:
        lines.append(f"\nCPU latency: {threads} threads, median of {rows[0]['latency_ms_per_image']['repeats']} "
                     "calls, in the file's runtime.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="distill run directory (its config names a trained teacher)")
    parser.add_argument("--format", dest="fmt", choices=("onnx", "pt2"), default="onnx")
    parser.add_argument("--latency-repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads the latency is timed with")
    parser.add_argument("--out", type=Path, help="folder for the files (default: RUN/export-table)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fkd.errors import FkdError

    try:
        rows = export_rows(args.run, args.out or args.run / "export-table", fmt=args.fmt,
                           latency_repeats=args.latency_repeats, threads=args.threads,
                           echo=lambda m: print(m, file=sys.stderr))
    except FkdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
