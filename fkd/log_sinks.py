"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard event files and Weights & Biases (``[log]``).

The loop (:func:`fkd.loop.run_epochs`) hands a :class:`MetricSink` what it has already pulled to the host
at its log intervals -- nothing here reads a tensor, so logging adds no sync inside an epoch:

* every ``train.log_every`` steps, per model: ``train/loss``, ``train/<term>`` (each loss term, unweighted),
  ``train/grad_norm`` and ``train/acc`` as means over the steps since the last interval, and ``train/lr``;
* at each epoch's end: ``epoch/test_acc``, ``epoch/train_acc``, ``epoch/train_loss``, ``epoch/images_per_s``;

all at the global step (``epoch * steps_per_epoch + step``), so a resumed run continues the curves (a
TensorBoard writer purges what an interrupted run wrote past the step it resumes from). The resolved config is written
once as text (``config``). A sweep gives each student a run of its own (``<run>/tensorboard/<student>``),
and when a student finishes, its hyper-parameters (its grid point and seed) and final metrics
(``final/test_acc``, ...) go to TensorBoard's HParams plugin, whose table and parallel-coordinates view
compare them.

``tensorboard`` (through ``torch.utils.tensorboard``) and ``wandb`` are imported only by
:func:`open_run_log` when the config asks for them; without the package that is one :class:`ConfigError`
naming the extra to install.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Protocol

from fkd.errors import ConfigError

#: Epoch record fields logged at each epoch's end, as ``epoch/<name>``.
EPOCH_FIELDS = {"test_acc": "test_acc", "train_acc": "train_acc", "train_loss": "train_loss",
                "images_per_s": "images_per_s"}
#: A sweep student's final metrics, as ``final/<name>`` (the HParams view's metric columns).
FINAL_FIELDS = ("test_acc", "train_acc", "train_loss")


class Writer(Protocol):
    """One run's destination: ``scalars(step, {tag: value})``, ``text(tag, text)``, ``hparams(...)``, ``close()``."""

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def text(self, tag: str, text: str) -> None: ...

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class MetricSink:
    """What the loop writes to: one :class:`Writer` list per model it trains (one, or a population's members)."""

    def __init__(self, members: list[list[Writer]]) -> None:
        self._members = members

    def begin(self, step: int) -> None:
        """Training starts (or resumes) at global ``step``: writers that purge stale events do so."""
        for writers in self._members:
            for w in writers:
                getattr(w, "begin", lambda s: None)(step)

    def train(self, step: int, rows: list[dict[str, float]]) -> None:
        """The log interval's means, one dict per member (``{"loss": .., "kd": .., "grad_norm": .., "acc": ..,
        "lr": ..}``), as ``train/<name>``."""
        for writers, row in zip(self._members, rows):
            values = {f"train/{k}": v for k, v in row.items() if _finite(v)}
            for w in writers:
                w.scalars(step, values)

    def pretrain(self, term: str, part: str, epoch: int, loss: float) -> None:
        """A term's pre-phase epoch (:mod:`fkd.pretrain`): its mean loss as ``pretrain/<term>.<part>`` at step
        ``epoch`` (from 1), for every member."""
        for writers in self._members:
            for w in writers:
                w.scalars(epoch, {f"pretrain/{term}.{part}": loss})

    def epoch(self, step: int, records: list[dict]) -> None:
        """Each member's epoch record (:func:`fkd.loop.run_epochs`) as ``epoch/<name>``."""
        for writers, record in zip(self._members, records):
            values = {f"epoch/{tag}": record[k] for k, tag in EPOCH_FIELDS.items() if _finite(record.get(k))}
            for w in writers:
                w.scalars(step, values)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class RunLog:
    """The writers of one run (``distill``, ``teacher``) or of every student of a sweep, opened by
    :func:`open_run_log`; :meth:`close` flushes them. Empty (no writers) when ``[log]`` asks for nothing."""

    def __init__(self, factories: list, config_text: str) -> None:
        self._factories = factories  # name -> Writer, one per destination
        self._config_text = config_text
        self._open: dict[str, list[Writer]] = {}

    def __bool__(self) -> bool:
        return bool(self._factories)

    def _writers(self, name: str) -> list[Writer]:
        if name not in self._open:
            writers = [make(name) for make in self._factories]
            for w in writers:
                w.text("config", "    " + self._config_text.replace("\n", "\n    "))  # a code block in Markdown
            self._open[name] = writers
        return self._open[name]

    def sink(self, names: list[str] | None = None) -> MetricSink | None:
        """The sink for one run (``names`` None) or for the sweep students ``names``, in population order."""
        if not self:
            return None
        return MetricSink([self._writers(n) for n in (names or [""])])

    def finished(self, name: str, hparams: dict[str, Any], record: dict, step: int) -> None:
        """Sweep student ``name`` finished: its ``hparams`` and final metrics (from its last epoch ``record``),
        for the HParams view; its writers are closed."""
        if not self:
            return
        metrics = {f"final/{k}": float(record[k]) for k in FINAL_FIELDS if _finite(record.get(k))}
        for w in self._writers(name):
            w.scalars(step, metrics)
            w.hparams({k: _hparam_value(v) for k, v in hparams.items()}, metrics, step)
            w.close()
        self._open.pop(name)

    def close(self) -> None:
        for writers in self._open.values():
            for w in writers:
                w.close()
        self._open.clear()


def _hparam_value(value):
    """An HParams value: a bool, number or string (a list becomes its text)."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def check_available(log) -> None:
    """Refuse a ``[log]`` destination whose package is not installed, when the config is checked (before any
    training), without importing it."""
    if log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("log.tensorboard = true needs the tensorboard package; install it with pip install "
                          "'fkd[tensorboard]' (or pip install tensorboard), or set log.tensorboard = false.")
    if log.wandb != "off" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"log.wandb = '{log.wandb}' needs the wandb package; install it with pip install "
                          "'fkd[wandb]' (or pip install wandb), or set log.wandb = 'off'.")


def open_run_log(log, run_path: Path, *, config_text: str, name: str) -> RunLog:
    """The :class:`RunLog` ``log`` (a :class:`fkd.config.LogConfig`) asks for, writing under ``run_path``.

    ``name`` names the run for W&B (the config's ``name``); a sweep student's writer is named after it.
    """
    factories = []
    if log.tensorboard:
        factories.append(_tensorboard_factory(Path(run_path) / "tensorboard"))
    if log.wandb != "off":
        factories.append(_wandb_factory(log, Path(run_path), name, config_text))
    return RunLog(factories, config_text)


# --- TensorBoard -------------------------------------------------------------------------------------


def _tensorboard_factory(root: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary
    except ImportError:
        raise ConfigError("log.tensorboard = true needs the tensorboard package; install it with pip install "
                          "'fkd[tensorboard]' (or pip install tensorboard), or set log.tensorboard = false.") from None

    class TensorBoardWriter:
        """A ``SummaryWriter`` under ``root`` (``root/<student>`` for a sweep student), opened at :meth:`begin`
        (purging events an interrupted run wrote past ``step``) or at the first write."""

        def __init__(self, name: str) -> None:
            self.path = root / name if name else root
            self._w = None
            self._text: list[tuple[str, str]] = []

        def begin(self, step: int) -> None:
            if self._w is None:
                # events past the resumed step came from training the checkpoint no longer holds: drop them
                self._w = SummaryWriter(str(self.path), purge_step=step + 1 if step else None)
                for tag, text in self._text:
                    self._w.add_text(tag, text, global_step=step)

        def _writer(self):
            self.begin(0)
            return self._w

        def scalars(self, step: int, values: dict) -> None:
            for tag, value in values.items():
                self._writer().add_scalar(tag, value, step)

        def text(self, tag: str, text: str) -> None:
            self._text.append((tag, text))  # written when the writer opens, after its purge

        def hparams(self, hparams: dict, metrics: dict, step: int) -> None:
            writer = self._writer().file_writer
            for summary in hparams_summary(hparams, metrics):  # experiment, session start, session end
                writer.add_summary(summary, step)

        def close(self) -> None:
            if self._w is not None:
                self._w.close()

    return TensorBoardWriter


# --- Weights & Biases ------------------------------------------------------------------------------------


def _wandb_factory(log, run_path: Path, run_name: str, config_text: str):
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"log.wandb = '{log.wandb}' needs the wandb package; install it with pip install "
                          "'fkd[wandb]' (or pip install wandb), or set log.wandb = 'off'.") from None
    import tomllib

    config = tomllib.loads(config_text)

    class WandbWriter:
        """One W&B run (a sweep student: one each, grouped under the sweep's name), files under ``<run>/wandb``."""

        def __init__(self, name: str) -> None:
            self._run = wandb.init(project=log.wandb_project, name=f"{run_name}/{name}" if name else run_name,
                                   group=run_name if name else None, dir=str(run_path), mode=log.wandb,
                                   config=config, reinit="create_new")

        def scalars(self, step: int, values: dict) -> None:
            if values:
                self._run.log(values, step=step)

        def text(self, tag: str, text: str) -> None:
            pass  # the config is the run's config already

        def hparams(self, hparams: dict, metrics: dict, step: int) -> None:
            self._run.config.update({"hparams": hparams}, allow_val_change=True)
            self._run.summary.update(metrics)

        def close(self) -> None:
            self._run.finish()

    return WandbWriter
