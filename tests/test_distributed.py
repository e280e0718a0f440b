"""Data-parallel training under torchrun (gloo, CPU): two processes give the single-process result.

Each test launches ``torchrun --standalone --nproc_per_node=2`` on tests/dp_child.py (fkd's CLI) with
one thread per process, on digits at 16 px with a global batch of 31 -- slices of 15 and 16 images, so
the share weighting of uneven slices is exercised too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fkd import cli
from fkd.distributed import slice_bounds
from fkd.pytree import tree_leaves
from tests.conftest import tiny_config_text

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().parent / "dp_child.py"


def dp_config(root: Path) -> str:
    """The two-process digits run: seed_cnn student, small_cnn teacher fitted once, batches of 31."""
    return tiny_config_text(
        root, "logit", dataset="digits", name="dp",
        data={"train_limit": 248, "batch_size": 31, "eval_batch_size": 100},
        teacher={"cache_dir": f"{root.as_posix()}/cache", "train": {"epochs": 1, "log_every": 4}},
        student={"arch": "seed_cnn", "widths": [8, 16]},
        # SGD: Adam's first steps enlarge last-bit differences of near-zero gradients (README)
        train={"log_every": 1, "optimizer": {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9}})


SWEEP_SETS = ("student.arch=small_cnn", "train.epochs=1", "train.log_every=4")
SETS = {"transfer": ("data.batch_size=32", "data.label_fraction=0.25", "data.transfer=unlabeled",
                     "data.labeled_share=0.25", "train.epochs=1"),
        "bn": ("student.arch=small_cnn", "train.epochs=1"),
        "bn-local": ("student.arch=small_cnn", "train.epochs=1", "train.sync_batchnorm=false")}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Fit the teacher once (in this process), then run every two-process command of the module in one
    torchrun launch: ``job(name)`` gives that command's run folder and each rank's output and exit code."""
    root = tmp_path_factory.mktemp("dp")
    config = root / "dp.toml"
    config.write_text(dp_config(root))
    with one_thread():
        result = CliRunner().invoke(cli.main, ["teacher", "--config", str(config), "--out", str(root / "teacher"),
                                               "--quiet"])
    assert result.exit_code == 0, result.output

    def distill_args(out: str, *sets: str, resume: bool = False) -> list[str]:
        args = ["distill", "--config", str(config), "--out", str(root / out)]
        return args + [a for s in sets for a in ("--set", s)] + (["--resume"] if resume else [])

    def sweep_args(out: str) -> list[str]:
        return ["sweep", "--config", str(config), "--out", str(root / out), "--seeds", "4", "--save", "best",
                *(a for s in SWEEP_SETS for a in ("--set", s))]

    jobs = [
        {"name": "two", "args": distill_args("two")},
        {"name": "bn", "args": distill_args("bn", *SETS["bn"], "train.log_every=4")},
        {"name": "transfer", "args": distill_args("transfer", *SETS["transfer"])},
        {"name": "bn-local", "args": distill_args("bn-local", *SETS["bn-local"], "train.log_every=4")},
        # rank 1 alone gets SIGTERM before its 11th step: epoch 2, step 3 of 8
        {"name": "stopped", "args": distill_args("stopped"), "signal": "1:11"},
        {"name": "resumed", "args": distill_args("stopped", resume=True)},
        {"name": "sweep", "args": sweep_args("sweep")},
        {"name": "bad-set", "args": distill_args("bad", "train.epochs=0")},  # refused by every rank alike
        {"name": "bad-resume", "args": distill_args("never-run", resume=True)},  # decided by rank 0 alone
        # last: rank 1 alone fails mid-run; it exits, torchrun stops rank 0 (blocked in the next all-reduce)
        {"name": "fault", "args": distill_args("fault"), "fault": "1:3"},
    ]
    logs = root / "logs"
    logs.mkdir()
    (logs / "jobs.json").write_text(json.dumps(jobs))
    launch = torchrun("--jobs", str(logs / "jobs.json"))
    assert "[rank" not in launch.stderr, launch.stderr[-3000:]  # no worker traceback

    def get(name: str) -> dict:
        out = {"run": root / name, "config": config, "root": root, "launch": launch}
        for rank in (0, 1):
            stem = f"{name}.rank{rank}"
            if name != "fault":  # there rank 0 is stopped by torchrun mid-job
                assert (logs / f"{stem}.rc").exists(), launch.stderr[-3000:]
            out[rank] = {k: (logs / f"{stem}.{k}").read_text() if (logs / f"{stem}.{k}").exists() else None
                         for k in ("out", "err", "rc")}
        return out

    return get


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def single(config: Path, out: Path, *sets: str) -> dict:
    """One process, in this one (no torchrun environment): the reference run."""
    with one_thread():
        args = ["distill", "--config", str(config), "--out", str(out), "--quiet"]
        result = CliRunner().invoke(cli.main, args + [a for s in sets for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    return load(out)


def load(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "latest.pt", weights_only=False)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(CHILD), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def max_diff(a: dict, b: dict) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(tree_leaves(a), tree_leaves(b)))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_slices_partition_the_batch_in_order():
    for n, world in ((31, 2), (64, 3), (5, 5), (7, 4)):
        parts = [slice_bounds(n, r, world) for r in range(world)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1


def test_two_processes_equal_one_and_write_the_run_once(job):
    two = job("two")
    assert two[0]["rc"] == two[1]["rc"] == "0", two[0]["err"][-3000:] + two[1]["err"][-3000:]
    one_run = two["root"] / "one"
    ref = single(two["config"], one_run)
    got = load(two["run"])
    assert max_diff(ref["state"]["params"], got["state"]["params"]) < 1e-5
    assert int(got["state"]["step"]) == int(ref["state"]["step"]) == 16
    # Written once, by rank 0: one record per epoch; the test pass is sharded and its counts summed.
    assert [r["epoch"] for r in records(two["run"])] == [1, 2]
    assert records(two["run"])[-1]["test_acc"] == records(one_run)[-1]["test_acc"]
    assert records(two["run"])[-1]["train_loss"] == pytest.approx(records(one_run)[-1]["train_loss"], rel=1e-5)
    assert sorted(p.name for p in two["run"].iterdir()) == sorted(p.name for p in one_run.iterdir())
    summary = json.loads((two["run"] / "summary.json").read_text())
    assert summary["student_test_acc"] == json.loads((one_run / "summary.json").read_text())["student_test_acc"]
    # Printed once, by rank 0, with the world size in the header and the progress lines.
    assert two[0]["out"].count("distill: student") == 1 and "2 processes (torchrun, gloo)" in two[0]["out"]
    assert two[0]["out"].count("student (seed_cnn, logit)") == 1
    assert two[0]["err"].count("student epoch 2/2 (2 processes)") == 8
    assert two[1]["out"] == two[1]["err"] == ""


def test_a_transfer_set_batch_is_shared_out_by_kind(job):
    """Each batch puts its 8 labeled images first: interleaved shares give each rank 4 of them, so the CE
    averaged over the labeled images (and the whole step) equals one process's."""
    two = job("transfer")
    assert two[0]["rc"] == two[1]["rc"] == "0", two[0]["err"][-3000:] + two[1]["err"][-3000:]
    ref = single(two["config"], two["root"] / "transfer-one", *SETS["transfer"])
    assert max_diff(ref["state"]["params"], load(two["run"])["state"]["params"]) < 1e-5
    assert records(two["run"])[-1]["train_ce"] == pytest.approx(records(two["root"] / "transfer-one")[-1]["train_ce"],
                                                                rel=1e-5)


def test_synchronised_batchnorm_equals_one_process(job):
    synced, local = job("bn"), job("bn-local")
    assert synced[0]["rc"] == local[0]["rc"] == "0", synced[0]["err"][-3000:] + local[0]["err"][-3000:]
    ref = single(synced["config"], synced["root"] / "bn-one", *SETS["bn"])
    got = load(synced["run"])
    assert max_diff(ref["state"]["params"], got["state"]["params"]) < 1e-5
    assert max_diff(ref["state"]["buffers"], got["state"]["buffers"]) < 1e-5  # running statistics too
    # train.sync_batchnorm = false: each rank normalises its own slice, so the statistics differ.
    assert max_diff(ref["state"]["buffers"], load(local["run"])["state"]["buffers"]) > 1e-4


def test_signal_on_one_rank_stops_all_at_one_step_and_resume_is_exact(job):
    stopped, resumed = job("stopped"), job("resumed")
    assert stopped[0]["rc"] == stopped[1]["rc"] == "143"  # 128 + SIGTERM, on both ranks
    assert stopped[0]["err"].count("interrupted by SIGTERM at epoch 2, step 3; checkpoint saved") == 1
    assert "torchrun --nproc_per_node=2 --no-python fkd distill" in stopped[0]["err"]
    assert stopped[1]["err"] == ""
    assert "student epoch 2/2 (2 processes) [###------" in stopped[0]["err"]  # stopped after step 3
    assert resumed[0]["rc"] == resumed[1]["rc"] == "0", resumed[0]["err"][-3000:]
    assert [r["epoch"] for r in records(stopped["run"])] == [1, 2]
    whole, got = load(job("two")["run"]), load(stopped["run"])
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves(whole["state"]), tree_leaves(got["state"])))


def test_bad_config_fails_on_every_rank_with_one_message(tmp_path):
    config = tmp_path / "dp.toml"
    config.write_text(dp_config(tmp_path))
    run = torchrun("distill", "--config", str(config), "--out", str(tmp_path / "bad"), "--set", "train.epochs=0")
    assert run.returncode != 0
    assert run.stderr.count("error: train.epochs must be >= 1 (got 0).") == 1
    # torchrun's report: each worker exited with 2, unless torchrun stopped it first when its peer had
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", run.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, run.stderr[-3000:]
    assert "[rank" not in run.stderr  # no worker traceback
    assert not (tmp_path / "bad").exists()


def test_refusals_stop_every_rank_with_one_message(job):
    for name, message in (("bad-set", "error: train.epochs must be >= 1 (got 0)."),
                          ("bad-resume", "error: nothing to resume in")):
        refused = job(name)
        assert refused[0]["rc"] == refused[1]["rc"] == "2"
        assert refused[0]["err"].startswith(message) and refused[0]["err"].count("error") == 1
        assert refused[1]["out"] == refused[1]["err"] == ""
    assert not (refused["root"] / "bad").exists() and not (refused["root"] / "never-run").exists()


def test_sweep_spreads_students_over_processes(job):
    sweep = job("sweep")
    assert sweep[0]["rc"] == sweep[1]["rc"] == "0", sweep[0]["err"][-3000:] + sweep[1]["err"][-3000:]
    one = sweep["root"] / "sweep-one"
    with one_thread():
        result = CliRunner().invoke(cli.main, ["sweep", "--config", str(sweep["config"]), "--out", str(one),
                                               "--seeds", "4", "--save", "best", "--quiet",
                                               *(a for s in SWEEP_SETS for a in ("--set", s))])
    assert result.exit_code == 0, result.output
    # each rank trained two of the four students; rank 0 gathered their records and wrote them once
    assert (sweep["run"] / "sweep.jsonl").read_text() == (one / "sweep.jsonl").read_text()
    assert sorted(p.name for p in (sweep["run"] / "students").iterdir()) == \
        sorted(p.name for p in (one / "students").iterdir())
    assert "students spread over 2 processes" in sweep[0]["out"]
    assert sweep[1]["out"] == sweep[1]["err"] == ""


def test_an_error_on_one_rank_stops_the_job_with_one_message(job):
    fault = job("fault")
    assert fault[1]["rc"] == "2"
    # rank 0, in the step's all-reduce, either saw its peer go (exit 1, silently) or torchrun stopped it first
    assert fault[0]["rc"] in ("1", None)
    assert fault[1]["err"].strip() == "error (rank 1): image 17 of the training set cannot be read (a test's fault)"
    assert "error" not in fault[0]["err"] and "Traceback" not in fault[0]["err"]
    assert fault["launch"].returncode != 0  # the launch ended (no hang) and torchrun reports the failure
    # torchrun names the first failure it saw: rank 1's exit 2, or rank 0 when it aborted first (the
    # peer's socket closed under it: "terminate called ...", SIGABRT); which one is a race
    assert re.search(r"rank\s*:\s*[01] \(local_rank: [01]\)\n\s*exitcode\s*:", fault["launch"].stderr)
