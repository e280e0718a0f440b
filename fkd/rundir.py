"""The run directory and what every command writes into it.

::

    runs/<name>/
        config.toml        the resolved config (every key, defaults included)
        metrics.jsonl      one JSON object per epoch: losses, accuracies, images/s, lr, wall time
        checkpoints/       latest.pt: the whole train state, from which --resume continues
        summary.json       teacher / student accuracy, baseline, parameter counts, compression, latency
        curves.png         loss and accuracy per epoch (needs matplotlib; skipped with a note otherwise)
        .fkd.lock          while an fkd command uses the run: its PID (see :mod:`fkd.runlock`)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fkd.atomic import atomic_write, cannot_write
from fkd.config import Config, dumps
from fkd.errors import FkdError, WriteError


class RunDir:
    """Paths of one run and the small writers for them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def latest(self) -> Path:
        return self.checkpoint_dir / "latest.pt"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def curves_path(self) -> Path:
        return self.path / "curves.png"

    def prepare(self) -> "RunDir":
        """Create the folder and prove it is writable, before any training starts."""
        ensure_writable(self.checkpoint_dir, what="the run directory", fix="pick another with --out")
        return self

    def write_config(self, cfg: Config) -> None:
        write_text_atomic(self.config_path, dumps(cfg))

    def read_metrics(self) -> list[dict[str, Any]]:
        """The epoch records of ``metrics.jsonl``, skipping lines that are not whole records (see
        :meth:`truncate_metrics`)."""
        return self._read_metrics()[0]

    def _read_metrics(self) -> tuple[list[dict[str, Any]], int]:
        if not self.metrics_path.is_file():
            return [], 0
        records, unreadable = [], 0
        for line in self.metrics_path.read_bytes().decode("utf-8", "replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                unreadable += 1
        return records, unreadable

    def append_metrics(self, record: dict[str, Any]) -> None:
        try:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise WriteError(cannot_write(self.metrics_path, exc)) from None

    def truncate_metrics(self, epochs_done: int) -> int:
        """Keep the records of the first ``epochs_done`` epochs (a resumed run rewrites the rest).

        A process killed while appending leaves a torn last line; the checkpoint, not this file, says
        where the run is, so such lines are dropped here. Returns how many were.
        """
        if not self.metrics_path.exists():
            return 0
        records, unreadable = self._read_metrics()
        kept = [r for r in records if r.get("epoch", 0) <= epochs_done]
        write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        return unreadable

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_text_atomic(self.summary_path, json.dumps(summary, indent=2) + "\n")


def ensure_writable(folder: Path, *, what: str, fix: str) -> None:
    """Create ``folder`` and write-test it; an :class:`FkdError` naming ``what`` and ``fix`` otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise FkdError(f"cannot write to {what} '{folder}' ({exc.strerror or exc}); {fix}.") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :mod:`fkd.atomic`)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def curves_figure(records: list[dict[str, Any]], title: str = ""):
    """A matplotlib figure of loss and accuracy per epoch under ``title`` (the run it shows, see
    :mod:`fkd.titles`); raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4.4))
    ax_loss.plot(epochs, [r["train_loss"] for r in records], marker="o", label="train loss")
    terms = [k for k in records[0] if k.startswith("train_") and k not in ("train_loss", "train_acc")]
    if len(terms) > 1:  # a weighted sum: show its terms too (unweighted)
        for key in terms:
            ax_loss.plot(epochs, [r.get(key) for r in records], linestyle="--", label=key.removeprefix("train_"))
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (mean over the epoch's batches)")
    ax_loss.legend()

    def pct(values):
        return [None if v is None else 100 * v for v in values]

    ax_acc.plot(epochs, pct([r["train_acc"] for r in records]), marker="o", label="train")
    ax_acc.plot(epochs, pct([r["test_acc"] for r in records]), marker="o", label="test")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend()
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_curves(records: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Draw loss and accuracy per epoch into ``path`` under ``title``; False when matplotlib is not installed."""
    try:
        fig = curves_figure(records, title)
    except ImportError:
        return False
    import matplotlib.pyplot as plt

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True
