"""What keeps the GPU busy: epoch metrics summed on the device with one host transfer per log interval,
evaluation without a sync per batch (padded for one compiled shape), the CUDA-graph step marking, the TF32
math mode and the memory-fit decision for data held on the device. Every test runs on a CPU."""

from __future__ import annotations

import pytest
import torch

import fkd.loop
from fkd import optim
from fkd.data import load_data
from fkd.data.bundle import holds_in_memory
from fkd.device import fits_on_device
from fkd.evaluate import evaluate_model, padded_batch
from fkd.loop import LoopSpec, accumulate, run_epochs, single_order_batches, steps_per_epoch
from fkd.models import build_model
from fkd.objective import from_weights
from fkd.population import Population, freeze_diverged
from fkd.step import float32_math, init_train_state, make_eval_step, make_train_step, maybe_compile
from tests.test_data import config as data_config

SIDE = 16


def tiny_run(n: int = 48, batch: int = 8):
    """A logit-KD step on synthetic data: ``(step, init_state(seed), source, teacher_vars)``."""
    data = load_data(data_config(name="synthetic", synthetic_size=n, image_size=SIDE, crop="random", pad=2,
                                 flip=True, normalize="none"))
    student, sp, sb = build_model("small_cnn", 10, SIDE, widths=(4, 8))
    teacher, tp, tb = build_model("small_cnn", 10, SIDE, widths=(8, 8), seed=1)
    objective = from_weights({"ce": 0.5, "logit": 0.5}, temperature=4.0)
    opt = optim.sgd(0.05, momentum=0.9)
    step = make_train_step(student, objective, opt, teacher=teacher, compile="off",
                           steps_per_epoch=steps_per_epoch(n, batch))

    def init(seed: int = 0):
        _, p, b = build_model("small_cnn", 10, SIDE, widths=(4, 8), seed=seed)
        return init_train_state(p, b, opt, seed=seed)

    return step, init, data.train, {"params": tp, "buffers": tb}


# --- the figures of today's loop, reimplemented as they were (a float() per value) ------------------


def old_accumulate(sums: dict, metrics: dict) -> dict:
    add = {k: v.detach() for k, v in metrics.items() if k != "finite"}
    add["steps"] = torch.ones((), dtype=torch.int64)
    return add if not sums else {k: sums[k] + v for k, v in add.items()}


def old_member(value: torch.Tensor, k: int) -> float:
    return float(value.reshape(-1)[k]) if value.ndim else float(value)


def old_mean(sums: dict, key: str, k: int = 0) -> float:
    return old_member(sums[key], k) / max(int(sums["steps"]), 1)


def old_figures(sums: dict, members: int) -> list[dict]:
    not_losses = ("loss", "correct", "count", "finite", "grad_norm", "steps")
    return [{"train_loss": old_mean(sums, "loss", k),
             **{f"train_{n}": old_mean(sums, n, k) for n in sums if n not in not_losses},
             "train_acc": old_member(sums["correct"], k) / max(old_member(sums["count"], k), 1.0)}
            for k in range(members)]


def same_figures(records: list[dict], expected: list[dict]) -> None:
    for record, want in zip(records, expected, strict=True):
        for key, value in want.items():
            assert record[key] == value, key  # exactly: the same float32 sums, read exactly


@pytest.mark.parametrize("log_every", [1, 4, 50])
def test_sync_free_metrics_equal_the_per_epoch_figures(log_every):
    step, init, source, teacher_vars = tiny_run()
    spec = LoopSpec("student", 2, 8, seed=3, augment=True, log_every=log_every, quiet=True)
    records = []
    run_epochs(step, init(), source, spec, teacher_vars=teacher_vars, on_epoch=records.append)
    # the reference: the same steps, summed and read the way the loop did before
    state, batches, expected = init(), single_order_batches(source, spec), []
    for epoch in range(2):
        sums = {}
        for batch in batches(epoch, 0):
            state, metrics = step(state, batch, teacher_vars)
            sums = old_accumulate(sums, metrics)
        expected += old_figures(sums, 1)
    assert {"train_loss", "train_ce", "train_logit", "train_acc"} <= set(records[0])
    same_figures(records, expected)


def test_population_figures_per_member_equal_the_per_epoch_figures():
    step, init, source, teacher_vars = tiny_run()
    population = Population(2, "loop", shared_batch=True)
    spec = LoopSpec("student", 1, 8, seed=0, augment=True, log_every=3, quiet=True, on_non_finite="freeze")
    records = []
    run_epochs(population.wrap(freeze_diverged(step)), population.gather([init(0), init(1)]), source, spec,
               population=population, teacher_vars=teacher_vars, on_epoch=records.append)
    states, sums = [init(0), init(1)], {}
    for batch in single_order_batches(source, spec)(0, 0):
        out = [step(st, batch, teacher_vars) for st in states]
        states = [o[0] for o in out]
        sums = old_accumulate(sums, {k: torch.stack([o[1][k] for o in out]) for k in out[0][1]})
    same_figures(records[0], old_figures(sums, 2))
    assert [r["diverged"] for r in records[0]] == [False, False]


@pytest.mark.parametrize("log_every, quiet", [(2, True), (4, False), (100, True)])
def test_one_host_transfer_per_log_interval(monkeypatch, log_every, quiet):
    step, init, source, teacher_vars = tiny_run(n=48, batch=8)  # 6 steps per epoch
    calls = []
    real = fkd.loop.to_host

    def counted(*args):
        calls.append(args[2])
        return real(*args)

    monkeypatch.setattr(fkd.loop, "to_host", counted)
    spec = LoopSpec("student", 1, 8, seed=0, augment=True, log_every=log_every, quiet=quiet)
    run_epochs(step, init(), source, spec, teacher_vars=teacher_vars)
    # at steps log_every, 2 log_every, ... and the epoch's last (the epoch end reuses the last transfer)
    assert calls == sorted({*range(log_every, 7, log_every), 6})


def test_a_non_finite_step_still_stops_the_run():
    step, init, source, teacher_vars = tiny_run()
    state = init()
    state["params"]["model"] = {k: v * float("nan") if k.endswith("weight") else v
                                for k, v in state["params"]["model"].items()}
    spec = LoopSpec("student", 1, 8, seed=0, augment=True, log_every=2, quiet=True)
    with pytest.raises(fkd.loop.TrainingError, match="epoch 1, step 1"):
        run_epochs(step, state, source, spec, teacher_vars=teacher_vars)


def test_the_running_sums_never_alias_a_steps_outputs():
    """A CUDA-graph step overwrites its outputs on the next replay: the first sums must be copies."""
    metrics = {"loss": torch.tensor(1.5), "correct": torch.tensor(3), "finite": torch.tensor(True)}
    sums = accumulate({}, metrics)
    metrics["loss"].fill_(99.0)  # what the next replay would do to the output's memory
    assert float(sums["loss"]) == 1.5 and "finite" not in sums
    assert float(accumulate(sums, {"loss": torch.tensor(2.0), "correct": torch.tensor(1)})["loss"]) == 3.5


# --- evaluation ------------------------------------------------------------------------------------


def test_padded_evaluation_equals_the_plain_one_and_a_reference():
    data = load_data(data_config(name="synthetic", synthetic_size=40, image_size=SIDE, normalize="none"))
    model, params, buffers = build_model("small_cnn", 10, SIDE, widths=(4, 8))
    plain = evaluate_model(model, params, buffers, data.test, batch_size=7, num_classes=10, device="cpu")
    # compile="on" pads the last batch to 7 rows (label -1); the step is given, so nothing compiles here
    padded = evaluate_model(model, params, buffers, data.test, batch_size=7, num_classes=10, device="cpu",
                            compile="on", eval_step=make_eval_step(model))
    assert padded == plain
    x, y, _ = next(data.test.batches(len(data.test), shuffle=False))
    logits, _, _ = model.apply(params, buffers, x, train=False)
    assert plain["correct"] == int((logits.argmax(-1) == y).sum()) and plain["count"] == len(data.test)
    px, py = padded_batch(x[:3], y[:3], 5)
    assert px.shape == (5, 3, SIDE, SIDE) and py.tolist() == [*y[:3].tolist(), -1, -1]


# --- CUDA graphs, TF32, memory fit (the CUDA parts through stand-ins) --------------------------------


def test_reduce_overhead_marks_every_call_as_a_new_cudagraph_step(monkeypatch):
    marks = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: fn)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    graphed = maybe_compile(lambda a: a + 1, "on", "cuda", "reduce-overhead")
    assert graphed(1) == 2 and graphed(2) == 3 and len(marks) == 2
    assert maybe_compile(lambda a: a, "on", "cuda", "default")(5) == 5 and len(marks) == 2
    assert maybe_compile(lambda a: a, "on", "cpu", "reduce-overhead")(5) == 5 and len(marks) == 2


def test_tf32_math_mode_is_set_on_cuda_only_and_restored():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with float32_math("tf32", "cpu"):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with float32_math("tf32", torch.device("cuda")):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with float32_math("fp32", "cuda"):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_data_is_held_on_the_device_when_it_fits(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 4000))
    assert fits_on_device(500, "cuda", limit=10**9) and not fits_on_device(501, "cuda", limit=10**9)
    assert not fits_on_device(400, "cuda", limit=300)
    assert fits_on_device(10**6, "cpu", limit=10**6) and not fits_on_device(10**6 + 1, "cpu", limit=10**6)
    # 10 views of 3 x 4 x 4 = 480 bytes: within half the (pretended) free 1000 bytes; 11 are not
    assert holds_in_memory("auto", 10, 4, "cuda") and not holds_in_memory("auto", 11, 4, "cuda")
    assert holds_in_memory("always", 10**9, 224, "cuda") and not holds_in_memory("never", 1, 4, "cpu")


def test_a_teacher_cache_read_from_disk_moves_onto_the_device_when_it_fits(monkeypatch):
    import fkd.cache
    from fkd.cache import TeacherCache, on_device_if_fits

    host = TeacherCache(torch.zeros(10, 4, dtype=torch.float16), {"f": torch.ones(10, 2, dtype=torch.float16)},
                        "cache.pt", torch.device("meta"))  # "meta": a device other than the CPU holding the file
    moved = on_device_if_fits(host)
    assert moved.logits.device.type == "meta" and moved.features["f"].device.type == "meta"
    assert moved.where == "cache.pt" and moved.logits.dtype == torch.float16
    monkeypatch.setattr(fkd.cache, "MEMORY_LIMIT_BYTES", 100)  # 120 bytes no longer fit
    assert on_device_if_fits(host) is host


def test_distill_takes_tf32_and_refuses_an_unknown_precision(tiny_config, tmp_path):
    """``train.precision = "tf32"`` runs end to end (on a CPU the math mode is a no-op) and its metrics say
    the same as fp32's; an unknown precision is one ``error:`` line."""
    import json

    from click.testing import CliRunner

    from fkd import cli

    cfg = tiny_config("logit")
    lines = {}
    for precision in ("fp32", "tf32"):
        out = tmp_path / precision
        result = CliRunner().invoke(cli.main, ["distill", "--config", str(cfg), "--out", str(out), "--quiet",
                                               "--set", "train.epochs=1", "--set", f"train.precision={precision}"])
        assert result.exit_code == 0, result.output
        lines[precision] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert lines["tf32"]["train_loss"] == lines["fp32"]["train_loss"]
    result = CliRunner().invoke(cli.main, ["distill", "--config", str(cfg), "--out", str(tmp_path / "x"),
                                           "--set", "train.precision=fp8"])
    assert result.exit_code == 2 and "error:" in result.output and "tf32" in result.output
