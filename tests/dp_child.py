"""A torchrun worker for tests/test_distributed.py: fkd's CLI, or several fkd commands in one launch.

``dp_child.py ARGS...`` is ``fkd ARGS...``. ``dp_child.py --jobs JOBS.json`` runs a list of fkd commands
one after another in the same processes (and process group), which saves a launch -- starting Python
and importing torch twice -- per command on a busy CI machine. Each job is
``{"name": ..., "args": [...], "signal": "RANK:STEP" (optional)}``; its stdout, stderr and exit code go
to ``<logs>/<name>.rank<R>.{out,err,rc}`` (``logs`` is the JSON's folder), so a test can check what
each rank printed. ``signal`` makes that rank alone send itself SIGTERM just before its STEP-th
training step (from 1), as if the signal had reached that rank only; ``fault`` makes it raise a
DataError there instead (an unreadable image on one node); ``freeze`` makes it sleep there for
``FKD_TEST_FREEZE_S`` seconds (a process that stops responding without exiting). The process exits with the last job's code,
as a lone fkd command would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _signal_at(spec: str | None, fault: bool = False, freeze: bool = False):
    """A ``make_train_step`` replacement that signals this rank (or raises a DataError on it) before step
    STEP when ``spec`` (``RANK:STEP``) names it."""
    import fkd.run_setup
    from fkd.errors import DataError

    real = fkd.run_setup.make_train_step
    if not spec:
        return real
    rank, at = (int(v) for v in spec.split(":"))
    if int(os.environ.get("RANK", "0")) != rank:
        return real

    def wrapped(*args, **kwargs):
        step = real(*args, **kwargs)
        calls = {"n": 0}

        def counting(state, batch, *rest):
            calls["n"] += 1
            if calls["n"] == at and fault:
                raise DataError("image 17 of the training set cannot be read (a test's fault)")
            if calls["n"] == at and freeze:
                time.sleep(float(os.environ.get("FKD_TEST_FREEZE_S", "6")))
                return step(state, batch, *rest)
            if calls["n"] == at:
                os.kill(os.getpid(), signal.SIGTERM)
            return step(state, batch, *rest)

        return counting

    return wrapped


def run_jobs(jobs_path: Path) -> None:
    import fkd.distributed
    import fkd.run_setup
    from fkd.cli import main

    real_step, real_shutdown = fkd.run_setup.make_train_step, fkd.distributed.shutdown
    fkd.distributed.shutdown = lambda: None  # the group outlives each command; left at the end
    rank = os.environ.get("RANK", "0")
    for job in json.loads(jobs_path.read_text()):
        stem = jobs_path.parent / f"{job['name']}.rank{rank}"
        fkd.run_setup.make_train_step = _signal_at(job.get("signal") or job.get("fault") or job.get("freeze"),
                                                   "fault" in job, "freeze" in job)
        code = 0
        with open(f"{stem}.out", "w") as out, open(f"{stem}.err", "w") as err, \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(job["args"], prog_name="fkd", standalone_mode=False)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        Path(f"{stem}.rc").write_text(str(code))
        fkd.run_setup.make_train_step = real_step
    if code:
        sys.exit(code)
    real_shutdown()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--jobs"]:
        run_jobs(Path(sys.argv[2]))
    else:
        from fkd.cli import main

        main(prog_name="fkd")
