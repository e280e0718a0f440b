"""How a run starts -- fresh, resumed, or refused -- decided before anything is written.

A refused command must leave the run directory as it was: ``--resume`` with another config, a new run
in a folder that already holds one, a batch larger than the data set. So ``fkd teacher`` and ``fkd
distill`` make every such decision first, holding the run's lock (:mod:`fkd.runlock`):

1. :func:`decide_start` reads the run directory (never writes) and returns a :class:`RunStart`, or
   raises the error that says why the command cannot run;
2. :meth:`RunStart.check_state` checks the fresh train state against a checkpoint being resumed;
3. only then :meth:`RunStart.begin` makes the first writes: the folders, the removal of temporary files
   a killed process left, and ``metrics.jsonl`` cut back to the checkpoint (dropping a torn last line).

:func:`fkd.fit.fit` then trains from where the :class:`RunStart` says.
"""

from __future__ import annotations

from typing import Callable

import attrs

from fkd.atomic import remove_stale_temporaries
from fkd.checkpoint import load_checkpoint
from fkd.errors import CheckpointError, ConfigError, FkdError
from fkd.loop import steps_per_epoch
from fkd.pytree import tree_signature
from fkd.rundir import RunDir


@attrs.frozen(eq=False)
class RunStart:
    """A decided start: ``saved`` is the checkpoint to resume from, None for a fresh run.

    ``kind`` is the checkpoint kind (``"teacher_run"`` or ``"student_run"``); ``config_text`` the
    resolved config the run is written with.
    """

    run: RunDir
    kind: str
    config_text: str
    saved: dict | None = None

    @property
    def epoch(self) -> int:
        """Epochs already done (0 for a fresh run)."""
        return int(self.saved["epoch"]) if self.saved is not None else 0

    @property
    def batch(self) -> int:
        """Batches of epoch :attr:`epoch` already done."""
        return int(self.saved["batch"]) if self.saved is not None else 0

    def check_state(self, fresh_state: dict) -> None:
        """A checkpoint being resumed must hold a state of ``fresh_state``'s layout (else the step would
        fail mid-run); CheckpointError otherwise. Reads only."""
        if self.saved is not None:
            check_same_structure(self.saved["state"], fresh_state, self.run)

    def begin(self, *, echo: Callable[[str], None] = print) -> None:
        """The run's first writes, once nothing can refuse it: its folders, the removal of temporary files
        a killed process left there, and ``metrics.jsonl`` cut back to the checkpoint's epoch (a torn last
        line dropped, with one note)."""
        run = self.run
        run.prepare()
        remove_stale_temporaries(run.path, [p.name for p in (run.config_path, run.metrics_path, run.summary_path,
                                                             run.curves_path)])
        remove_stale_temporaries(run.checkpoint_dir, [run.latest.name])
        dropped = self.run.truncate_metrics(self.epoch)
        if dropped:
            echo(f"note: dropped {dropped} unreadable line{'s' if dropped > 1 else ''} (a write cut short) from "
                 f"{self.run.metrics_path}; the checkpoint says where the run is, and the records of its "
                 f"{self.epoch} finished epoch{'s' if self.epoch != 1 else ''} are kept.")


def decide_start(run: RunDir, *, kind: str, config_text: str, resume: bool, num_examples: int,
                 batch_size: int, label: str) -> RunStart:
    """Whether ``run`` starts fresh or resumes; an :class:`FkdError` saying why when it can do neither.

    Reads only. ``resume`` is ``--resume``: required to continue a checkpoint, refused without one. A
    resumed run must have been started with the same config except the epoch counts, which may grow.
    ``num_examples`` / ``batch_size`` / ``label`` describe the training set: it must hold one batch.
    """
    check_one_batch(num_examples, batch_size, label)
    if run.latest.exists():
        if not resume:
            raise FkdError(
                f"'{run.path}' already holds a run (checkpoints/latest.pt); pass --resume to continue it "
                "or --out DIR to start a new one."
            )
        saved = load_checkpoint(run.latest, kind)
        if saved.get("config_key") != config_key(config_text):
            raise CheckpointError(
                f"the run in '{run.path}' was started with a different config; resume it with its own "
                f"config ({run.config_path}) or start a new run with --out."
            )
        return RunStart(run, kind, config_text, saved)
    if resume:
        raise FkdError(f"nothing to resume in '{run.path}' (no checkpoints/latest.pt); run without --resume.")
    return RunStart(run, kind, config_text)


def check_one_batch(num_examples: int, batch_size: int, label: str) -> None:
    """The training set must hold one batch (batches are full, the last partial one dropped); a run of
    zero steps would otherwise "finish" and report an untrained model."""
    if steps_per_epoch(num_examples, batch_size) == 0:
        raise ConfigError(f"the {label} training set has {num_examples} images, fewer than one batch of "
                          f"{batch_size}; lower data.batch_size.")


def config_key(config_text: str) -> str:
    """The config with the epoch counts and the ``[log]`` table removed: what must match for a resume (a
    resumed run may start or stop logging to TensorBoard / W&B)."""
    lines, in_log = [], False
    for line in config_text.splitlines():
        if line.startswith("["):
            in_log = line.strip() == "[log]"
        if not in_log and not line.startswith("epochs = "):
            lines.append(line)
    return "\n".join(lines).rstrip("\n")


def check_same_structure(saved: dict, fresh: dict, run: RunDir) -> None:
    """A checkpoint's state must have the fresh state's leaves, shapes and dtypes (else the step would fail)."""
    have, want = tree_signature(saved), tree_signature(fresh)
    if have.keys() != want.keys():
        diff = sorted(set(have) ^ set(want))
        raise CheckpointError(
            f"the checkpoint in '{run.path}' holds a train state of another layout (e.g. '{diff[0]}'), written "
            "by another fkd version or objective; start a new run with --out."
        )
    for path, sig in want.items():
        if have[path] != sig:
            raise CheckpointError(f"the checkpoint in '{run.path}' holds '{path}' as {have[path]}, but this run "
                                  f"needs {sig}; start a new run with --out.")
