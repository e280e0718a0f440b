"""Memory over a long run: does the process grow from one epoch to the next?

Runs distillation the way ``fkd distill`` does (:func:`fkd.distill.run_distill`, glibc tuned as the CLI
tunes it) for many short epochs and prints after each epoch:

* ``RSS MB`` -- the process's resident set (``VmRSS``) and ``peak MB``, its high-water mark (``VmHWM``);
* ``heap MB`` -- the bytes glibc's malloc has handed out and not got back (``mallinfo2``: ``uordblks +
  hblkhd``, main arena), where CPU tensors live. Freed memory that the allocator keeps for reuse counts
  in the RSS but not here, so a leak shows in this column even before it pushes the RSS past its peak.

A leak -- a tensor kept per step or per epoch, a history that grows -- is a rise that does not level
off; allocator noise moves a fraction of a MB and stays.

    python bench/memory.py                                    # configs/feature.toml on digits, 30 epochs
    python bench/memory.py --config configs/logit.toml --set data.flip=true    # the teacher runs live
    python bench/memory.py --epochs 50 --set data.name=synthetic --set data.synthetic_size=512

Everything goes to a temporary folder, removed at the end. The teacher is fitted there first, for one
epoch and in a separate process (``python cli.py teacher``), so that what its fit allocated does not mask
the student's run: its quality does not change the memory a student's epoch needs. This is a measurement
to read, not a test with a threshold.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))  # run from a clone without installing fkd

from fkd.config import Config  # noqa: E402
from fkd.build import load_config  # noqa: E402
from fkd.rundir import RunDir  # noqa: E402


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None
    fn.restype = _Mallinfo2
    return fn


_MALLINFO2 = _mallinfo2()


def memory_mb() -> dict[str, float | None]:
    """``rss_mb``, ``peak_rss_mb`` (Linux's ``/proc``; elsewhere the peak from ``getrusage`` for both) and
    ``heap_mb`` (glibc's bytes in use, None without ``mallinfo2``) of this process."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    peak = fields.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    heap = None
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        heap = (info.uordblks + info.hblkhd) / 2**20
    return {"rss_mb": fields.get("VmRSS", peak), "peak_rss_mb": peak, "heap_mb": heap}


class _MeasuredRun(RunDir):
    """A run directory that also measures memory each time an epoch's record is written."""

    def __init__(self, path: Path, rows: list, echo: Callable[[str], None]) -> None:
        super().__init__(path)
        self.rows, self.echo = rows, echo

    def append_metrics(self, record: dict) -> None:
        super().append_metrics(record)
        row = {"epoch": record["epoch"], **memory_mb(), "epoch_seconds": record["epoch_seconds"],
               "test_acc": record["test_acc"]}
        self.rows.append(row)
        heap = "n/a" if row["heap_mb"] is None else f"{row['heap_mb']:.1f}"
        self.echo(f"{row['epoch']:>5}  {row['rss_mb']:9.1f}  {row['peak_rss_mb']:9.1f}  {heap:>9}  "
                  f"{row['epoch_seconds']:8.2f}  {row['test_acc']:8.2%}")


def measure(cfg: Config, folder: Path, *, echo: Callable[[str], None] = print) -> list[dict]:
    """Distill per ``cfg`` into ``folder/student``; one row per epoch: epoch, rss_mb, peak_rss_mb, heap_mb,
    epoch_seconds, test_acc."""
    from fkd.device import resolve_device
    from fkd.distill import run_distill

    rows: list[dict] = []
    echo(f"{'epoch':>5}  {'RSS MB':>9}  {'peak MB':>9}  {'heap MB':>9}  {'seconds':>8}  {'test acc':>8}")
    run_distill(cfg, _MeasuredRun(folder / "student", rows, echo), resolve_device(cfg.device), quiet=True,
                echo=lambda message: None)
    return rows


def _change(rows: list[dict], key: str) -> str:
    first, last = rows[1][key], rows[-1][key]  # from the end of epoch 2: epoch 1 holds one-time allocations
    if first is None:
        return "n/a"
    values = [r[key] for r in rows[1:]]
    return f"{last - first:+.1f} MB (range {min(values):.1f}-{max(values):.1f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPOSITORY / "configs" / "feature.toml"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from fkd.device import resolve_device
    from fkd.objective import from_config
    from fkd.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    with tempfile.TemporaryDirectory(prefix="fkd-memory-") as tmp:
        folder = Path(tmp)
        overrides = [f"train.epochs={args.epochs}", "teacher.train.epochs=1",
                     f'teacher.checkpoint="{(folder / "teacher" / "teacher.pt").as_posix()}"',
                     f'teacher.cache_dir="{(folder / "cache").as_posix()}"', *args.overrides]
        cfg = load_config(args.config, overrides)
        if from_config(cfg.distill).needs_teacher:
            print(f"# fitting the teacher ({cfg.teacher.arch}, {cfg.teacher.train.epochs} epoch) in another process")
            sets = [item for text in overrides for item in ("--set", text)]
            subprocess.run([sys.executable, str(REPOSITORY / "cli.py"), "teacher", "--config", args.config, *sets,
                            "--out", str(folder / "teacher"), "--quiet"], check=True, stdout=subprocess.DEVNULL)
        print(f"# {args.config}, {cfg.train.epochs} epochs, data {cfg.data.name}, student {cfg.student.arch}, "
              f"method {cfg.distill.preset}, device {resolve_device(cfg.device)}; memory after each epoch")
        rows = measure(cfg, folder)
    if len(rows) > 2:
        print(f"epoch 2 -> {rows[-1]['epoch']}: RSS {_change(rows, 'rss_mb')}, peak {_change(rows, 'peak_rss_mb')}, "
              f"heap {_change(rows, 'heap_mb')}")


if __name__ == "__main__":
    main()
