"""bench/harness.py (``fkd bench``) and its imperative baseline: rows, JSON lines, and the same loss on both sides.

No timing is asserted: the numbers depend on the machine. What is asserted is that the benchmark is
apples to apples (the imperative baseline computes fkd's objective on the same weights and batch) and
that its output has the promised shape.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from fkd import cli
from fkd import objective as objective_lib
from fkd.clone_files import load_clone_module
from fkd.build import load_config
from fkd.errors import ConfigError
from fkd.models import build_model
from fkd.models.functional import feature_shapes
from fkd.objective import from_weights
from fkd.optim import apply_updates, sgd
from fkd.pytree import tree_map
from fkd.terms import Shapes, TermInputs
from tests.conftest import tiny_config_text

harness = load_clone_module("bench/harness.py", "the benchmark harness")
VARIANTS, resolve_variants, run_bench = harness.VARIANTS, harness.resolve_variants, harness.run_bench
load_imperative_baseline = harness.load_imperative_baseline

REQUIRED = ("variant", "ms_per_step", "images_per_s", "peak_mem_mb")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tmp_path, method="feature", extra=()):
    """A tiny config: small_cnn student, ResNet-18 teacher (features by hook), 16 px synthetic data."""
    path = tmp_path / "bench.toml"
    path.write_text(tiny_config_text(
        tmp_path, method, name="bench-tiny", seed=None,
        data={"batch_size": 8, "synthetic_size": 16, "eval_batch_size": None, "num_workers": 0},
        teacher={"arch": "resnet18", "widths": None, "weights": None, "mode": None, "checkpoint": None,
                 "fit_if_missing": None, "train": None},
        train={"epochs": None, "log_every": None},
        distill={"student_features": ["block1", "block2"], "teacher_features": ["layer1", "layer1"], "beta": 2.0}))
    return load_config(path, list(extra)), path


def test_run_bench_returns_rows_with_positive_numbers_and_equal_first_losses(tmp_path):
    cfg, _ = tiny(tmp_path)
    report = run_bench(cfg, "cpu", steps=2, warmup=1,
                       variants=["cached", "imperative", "functional", "student_only"])
    rows = {r["variant"]: r for r in report.rows}
    assert list(rows) == ["imperative", "functional", "student_only", "cached"]  # canonical order
    for r in report.rows:
        assert set(REQUIRED) <= set(r)
        for key in ("ms_per_step", "images_per_s", "peak_mem_mb"):
            assert r[key] > 0 and math.isfinite(r[key])
    assert rows["imperative"]["ratio"] == pytest.approx(1.0)
    # Same weights, same batch, same objective: the first step's loss agrees across the styles.
    assert rows["functional"]["first_loss"] == pytest.approx(rows["imperative"]["first_loss"], abs=1e-5)
    assert rows["cached"]["first_loss"] == pytest.approx(rows["imperative"]["first_loss"], abs=1e-5)
    assert rows["student_only"]["compiled"] is False and rows["cached"]["compiled"] is False
    table = report.table()
    assert "imperative" in table and "cached / student_only" in table


def _both_losses(cfg, x, y):
    """fkd's objective and the imperative baseline's loss on the same weights and batch."""
    obj = objective_lib.from_config(cfg.distill)
    student, sp, sb = build_model("small_cnn", 4, 16, obj.student_feature_names, widths=(4, 8), seed=0)
    teacher, tp, tb = build_model("resnet18", 4, 16, obj.teacher_feature_names, seed=1)
    shapes = Shapes(feature_shapes(student, sp, sb, 16, "cpu"), feature_shapes(teacher, tp, tb, 16, "cpu"))
    params, state = obj.init(shapes)
    with torch.no_grad():
        t_logits, t_feats, _ = teacher.apply(tp, tb, x, train=False)
    s_logits, s_feats, _ = student.apply(sp, sb, x, train=True)
    fkd_loss, _, _ = obj(params, state, _inputs(s_logits, s_feats, y, t_logits, t_feats))
    imp = load_imperative_baseline().ImperativeDistiller(
        obj, student, {"params": sp, "buffers": sb}, cfg.train.optimizer, teacher=teacher,
        teacher_vars={"params": tp, "buffers": tb}, regressors=params.get("feature", {}))
    return fkd_loss, imp.loss(x, y), imp, (student, sp, sb, teacher, tp, tb, params, obj)


def _inputs(s_logits, s_feats, y, t_logits, t_feats) -> TermInputs:
    return TermInputs(s_logits, s_feats, y, t_logits, t_feats, None, torch.zeros((), dtype=torch.int64))


@pytest.mark.parametrize("method, extra", [
    ("feature", ()),
    ("logit", ()),
    ("attention", ()),
    ("combined", ("distill.weights={ce = 0.5, logit = 0.25, feature = 1.0, attention = 3.0}",)),
])
def test_imperative_baseline_computes_fkds_objective(tmp_path, method, extra):
    cfg, _ = tiny(tmp_path, method, extra)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    fkd_loss, imp_loss, _, _ = _both_losses(cfg, x, y)
    assert imp_loss.item() == pytest.approx(fkd_loss.item(), abs=1e-5, rel=1e-5)


def test_imperative_step_matches_fkds_step_with_sgd(tmp_path):
    # One SGD step on each side, then the loss again: gradients (hooks, regressors, interpolation)
    # and the update agree, not only the forward pass.
    cfg, _ = tiny(tmp_path, "feature", ("train.optimizer.name=sgd", "train.optimizer.learning_rate=0.1"))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    _, _, imp, (student, sp, sb, teacher, tp, tb, regs, obj) = _both_losses(cfg, x, y)
    imp.train_step(x, y)

    def loss_fn(trainable):
        with torch.no_grad():
            t_logits, t_feats, _ = teacher.apply(tp, tb, x, train=False)
        s_logits, s_feats, _ = student.apply(trainable["model"], sb, x, train=True)
        return obj(trainable["objective"], {}, _inputs(s_logits, s_feats, y, t_logits, t_feats))[0]

    trainable = {"model": sp, "objective": regs}
    grads = torch.func.grad(loss_fn)(trainable)
    opt = sgd(0.1)
    updates, _ = opt.update(grads, opt.init(trainable), trainable)
    after = apply_updates(trainable, updates)
    # BatchNorm's running stats are not used in train mode, so the buffers need not be threaded here.
    assert imp.loss(x, y).item() == pytest.approx(loss_fn(after).item(), abs=1e-5, rel=1e-5)
    moved = tree_map(lambda a, b: (a - b).abs().max(), after["model"], sp)
    assert max(v.item() for v in moved.values()) > 0


def test_hook_on_a_module_called_twice_is_refused(tmp_path):
    # ResNet's BasicBlock calls its one ReLU twice; a hook would see the second call, fkd the first.
    cfg, _ = tiny(tmp_path, "feature", ('distill.teacher_features=["layer1.0.relu", "layer1"]',))
    with pytest.raises(ConfigError, match="called 2 times"):
        run_bench(cfg, "cpu", steps=1, warmup=1, variants=["imperative"])


def test_variant_selection():
    feature = from_weights({"ce": 0.7, "feature": 0.3}, pairs=(("block2", "layer1"),))
    assert resolve_variants(None, feature) == VARIANTS
    assert "cached" not in resolve_variants(None, from_weights({"ce": 1.0}))
    assert resolve_variants(["functional", "imperative"], feature) == ("imperative", "functional")
    with pytest.raises(ConfigError, match="unknown bench variant 'eager'"):
        resolve_variants(["eager"], feature)
    with pytest.raises(ConfigError, match="cached"):
        resolve_variants(["cached"], from_weights({"ce": 1.0}))


def test_cli_json_is_one_object_per_line_and_variant(tiny_config, tmp_path):
    # conftest's tiny config: small_cnn teacher and student, synthetic 16 px; 20 steps is the CLI's minimum.
    path = tiny_config("feature")
    result = CliRunner().invoke(cli.main, ["bench", "--config", str(path), "--device", "cpu", "--json",
                                           "--variants", "imperative,functional,cached", "--warmup", "1",
                                           "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines]
    assert [r["variant"] for r in rows] == ["imperative", "functional", "cached"]
    for r in rows:
        assert set(REQUIRED) <= set(r) and r["ms_per_step"] > 0 and r["steps"] == 20
        assert r["device"] == "cpu"
    saved = [json.loads(line) for line in (tmp_path / "b" / "bench.jsonl").read_text().splitlines()]
    assert saved == rows


def test_cli_refuses_fewer_than_20_steps_and_unknown_variants(tiny_config):
    path = tiny_config("feature")
    result = CliRunner().invoke(cli.main, ["bench", "--config", str(path), "--steps", "5"])
    assert result.exit_code == 2 and "20" in result.output
    result = CliRunner().invoke(cli.main, ["bench", "--config", str(path), "--variants", "fast"])
    assert result.exit_code == 2 and "valid variants" in result.output


def test_imperative_baseline_refuses_an_optimizer_it_has_no_counterpart_for():
    from fkd.config import OptimizerConfig
    from fkd.optim import OPTIMIZERS

    imperative = load_imperative_baseline()
    assert set(imperative.TORCH_OPTIMIZERS) == set(OPTIMIZERS.names())  # one torch.optim twin per optimizer
    with pytest.raises(ConfigError, match="no torch.optim counterpart of optimizer 'lion'"):
        imperative.torch_optimizer(OptimizerConfig(name="lion"), [torch.zeros(2, requires_grad=True)])


def test_bench_from_an_installed_wheel_says_what_is_missing(monkeypatch, tmp_path):
    import fkd.clone_files as clone_files
    from fkd.errors import FkdError

    monkeypatch.setattr(clone_files, "REPOSITORY", tmp_path)  # a site-packages install: no bench/ beside fkd/
    with pytest.raises(FkdError, match=r"the benchmark harness \(bench/harness2.py\) is not part of an installed fkd"):
        clone_files.load_clone_module("bench/harness2.py", "the benchmark harness")


def test_imperative_is_skipped_for_a_term_it_cannot_express():
    import attrs

    from fkd.objective import build
    from fkd.terms import TERMS, Term, register_term

    if "test_bench_only_term" not in TERMS:
        @register_term("test_bench_only_term")
        @attrs.frozen
        class Unexpressible(Term):
            consumes = frozenset({"student_logits"})

            def apply(self, params, state, inputs):
                return inputs.student_logits.pow(2).mean(), state

    obj = build({"ce": {"weight": 1.0}, "test_bench_only_term": {"weight": 0.1}})
    said = []
    assert "imperative" not in resolve_variants(None, obj, said.append)
    assert said and "test_bench_only_term" in said[0]
    with pytest.raises(ConfigError, match="cannot express the term"):
        resolve_variants(["imperative", "functional"], obj)


def test_sweep_bench_times_k_students_against_k_plain_steps(tmp_path):
    cfg, _ = tiny(tmp_path, "logit")
    report = run_bench(cfg, "cpu", steps=2, warmup=1, sweep=3)
    rows = {r["variant"]: r for r in report.rows}
    assert list(rows) == ["sweep_sequential", "sweep", "sweep_vmap"]  # the CPU runs a loop, so vmap is shown too
    assert rows["sweep_sequential"]["ratio"] == pytest.approx(1.0) and all(r["students"] == 3 for r in report.rows)
    # The same three students from the same weights: the summed first losses agree across the ways.
    assert rows["sweep"]["first_loss"] == pytest.approx(rows["sweep_sequential"]["first_loss"], rel=1e-5)
    assert rows["sweep_vmap"]["first_loss"] == pytest.approx(rows["sweep_sequential"]["first_loss"], rel=1e-5)
    assert "x sweep_sequential" in report.table()
    with pytest.raises(ConfigError, match="--sweep picks its own variants"):
        run_bench(cfg, "cpu", steps=1, warmup=1, sweep=3, variants=["imperative"])
