"""Tests for fkd.step: the pure train step, the eval step, and the train state they thread.

The step is checked against an independent imperative computation (the seed notebook's loop: a
stateful ``nn.Module``, ``loss.backward()`` and ``torch.optim.SGD``), against itself compiled and
vmapped, and for purity: its inputs are never written, it registers no module hooks, it never syncs
with the host, and a non-finite step changes nothing but the step counters.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

import fkd
from fkd import optim
from fkd.config import DistillConfig
from fkd.models import build_model
from fkd.models.students import SeedCNN, SmallCNN
from fkd.objective import from_config, from_weights
from fkd.terms import Shapes, TermInputs
from fkd.pytree import tree_leaves, tree_map
from fkd.step import init_train_state, make_eval_step, make_train_step
from tests.notebook_reference import blended_distillation_loss

SIDE = 16


def make_batch(b: int = 4, side: int = SIDE, seed: int = 0, classes: int = 10) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(b, 3, side, side, generator=g), "y": torch.randint(0, classes, (b,), generator=g)}


def snapshot(tree):
    """Every tensor leaf of ``tree`` with a clone and its ``_version``."""
    return [(t, t.detach().clone(), t._version) for t in tree_leaves(tree)]


def assert_untouched(snap) -> None:
    for i, (t, clone, version) in enumerate(snap):
        assert t._version == version, f"leaf {i} was written in place"
        assert torch.equal(t, clone), f"leaf {i} changed"


def assert_trees_close(a, b, atol: float, rtol: float = 0.0) -> None:
    la, lb = tree_leaves(a), tree_leaves(b)
    assert len(la) == len(lb)
    for i, (x, y) in enumerate(zip(la, lb)):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m, i=i: f"leaf {i}: {m}")


def assert_trees_equal(a, b) -> None:
    la, lb = tree_leaves(a), tree_leaves(b)
    assert len(la) == len(lb)
    assert all(torch.equal(x, y) for x, y in zip(la, lb))


# --- a small distillation setup: BatchNorm student and teacher, every loss term ------------------

PAIRS = (("block1", "block1"), ("block2", "block2"))
WEIGHTS = {"ce": 0.5, "logit": 0.3, "feature": 0.2, "attention": 1.0}


@pytest.fixture(scope="module")
def setup():
    student, s_params, s_buffers = build_model("small_cnn", 10, SIDE, ("block1", "block2"), widths=(4, 8))
    teacher, t_params, t_buffers = build_model("small_cnn", 10, SIDE, ("block1", "block2"), widths=(8, 16), seed=1)
    objective = from_weights(WEIGHTS, pairs=PAIRS, temperature=2.0)
    regressors, _ = objective.init(Shapes({"block1": (4, 8, 8), "block2": (8, 4, 4)},
                                          {"block1": (8, 8, 8), "block2": (16, 4, 4)}))
    optimizer = optim.sgd(0.1, momentum=0.9, weight_decay=1e-3)
    state = init_train_state(s_params, s_buffers, optimizer, objective_params=regressors)
    teacher_vars = {"params": t_params, "buffers": t_buffers}
    return {"student": student, "teacher": teacher, "objective": objective, "optimizer": optimizer,
            "state": state, "teacher_vars": teacher_vars}


def eager_step(setup, **kw):
    return make_train_step(setup["student"], setup["objective"], setup["optimizer"], teacher=setup["teacher"],
                           compile="off", **kw)


def test_step_leaves_its_inputs_untouched(setup):
    state, tv, batch = setup["state"], setup["teacher_vars"], make_batch()
    snaps = [snapshot(state), snapshot(batch), snapshot(tv)]
    new_state, metrics = eager_step(setup)(state, batch, tv)
    for snap in snaps:
        assert_untouched(snap)
    # ...and the step did do something: new params, new running stats, advanced counters.
    assert not torch.equal(new_state["params"]["model"]["fc.weight"], state["params"]["model"]["fc.weight"])
    assert not torch.equal(new_state["buffers"]["blocks.0.1.running_mean"], state["buffers"]["blocks.0.1.running_mean"])
    assert not torch.equal(new_state["params"]["objective"]["feature"]["block2->block2"]["weight"],
                           state["params"]["objective"]["feature"]["block2->block2"]["weight"])
    assert new_state["step"] == 1 and state["step"] == 0
    assert new_state["bad_step"] == -1
    assert set(metrics) >= {"loss", *WEIGHTS, "correct", "count", "grad_norm", "finite"}


def test_compiled_step_matches_eager_and_does_not_recompile():
    from torch._dynamo.utils import counters

    # The smallest network that still has BatchNorm and every loss term: inductor's CPU compile time
    # grows with the number of kernels (about a second of C++ compilation each on a cold cache).
    student, sp, sb = build_model("small_cnn", 10, SIDE, ("block1",), widths=(4,))
    teacher, tp, tb = build_model("small_cnn", 10, SIDE, ("block1",), widths=(8,), seed=1)
    objective = from_weights(WEIGHTS, pairs=(("block1", "block1"),))
    regressors, _ = objective.init(Shapes({"block1": (4, 8, 8)}, {"block1": (8, 8, 8)}))
    optimizer = optim.sgd(0.1, momentum=0.9, weight_decay=1e-3)
    state, tv = init_train_state(sp, sb, optimizer, objective_params=regressors), {"params": tp, "buffers": tb}
    batches = [make_batch(seed=0), make_batch(seed=1)]
    eager = make_train_step(student, objective, optimizer, teacher=teacher, compile="off")
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = make_train_step(student, objective, optimizer, teacher=teacher, compile="on")
        assert hasattr(compiled, "_torchdynamo_orig_callable")  # really a torch.compile wrapper
        e_state, e_metrics = eager(state, batches[0], tv)
        c_state, c_metrics = compiled(state, batches[0], tv)
        assert_trees_close(c_state, e_state, atol=1e-5)
        assert_trees_close(c_metrics, e_metrics, atol=1e-5)
        assert not torch.equal(c_state["params"]["model"]["fc.weight"], state["params"]["model"]["fc.weight"])
        # Different values of the same shapes (step count, params, batch): must reuse the graph.
        with torch._dynamo.config.patch(error_on_recompile=True):
            c_state2, c_metrics2 = compiled(c_state, batches[1], tv)
        e_state2, e_metrics2 = eager(e_state, batches[1], tv)
        assert_trees_close(c_state2, e_state2, atol=1e-5)
        assert_trees_close(c_metrics2, e_metrics2, atol=1e-5)
        # The whole step is one graph, not a loss graph stitched to eager optimizer code.
        assert counters["stats"]["unique_graphs"] == 1
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()


def test_auto_compile_stays_eager_on_cpu(setup):
    args = (setup["student"], setup["objective"], setup["optimizer"])
    for kw in ({}, {"device": "cpu"}):
        step = make_train_step(*args, compile="auto", **kw)
        assert inspect.isfunction(step) and step.__name__ == "step"
        assert not hasattr(step, "_torchdynamo_orig_callable")
        assert not isinstance(step, torch._dynamo.eval_frame.OptimizedModule)
        ev = make_eval_step(setup["student"], compile="auto", **kw)
        assert inspect.isfunction(ev) and not hasattr(ev, "_torchdynamo_orig_callable")
    # On CUDA "auto" compiles (torch.compile is lazy: nothing is traced here, no GPU needed).
    assert hasattr(make_train_step(*args, compile="auto", device="cuda"), "_torchdynamo_orig_callable")


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vmap_over_stacked_states_equals_separate_steps(batch_norm):
    names = ("block2",)
    student, p0, b0 = build_model("small_cnn", 10, SIDE, names, widths=(4, 8), batch_norm=batch_norm, seed=0)
    _, p1, b1 = build_model("small_cnn", 10, SIDE, names, widths=(4, 8), batch_norm=batch_norm, seed=1)
    teacher, tp, tb = build_model("small_cnn", 10, SIDE, names, widths=(8, 16), seed=5)
    objective = from_weights({"ce": 0.5, "logit": 0.5, "feature": 0.3}, pairs=(("block2", "block2"),))
    shapes = ({"block2": (8, 4, 4)}, {"block2": (16, 4, 4)})
    optimizer = optim.adam(1e-2)
    states = [
        init_train_state(p, b, optimizer, objective_params=objective.init(Shapes(*shapes), seed=i)[0], seed=i)
        for i, (p, b) in enumerate(((p0, b0), (p1, b1)))
    ]
    stacked = tree_map(lambda a, b: torch.stack([a, b]), *states)
    batch, tv = make_batch(), {"params": tp, "buffers": tb}
    step = make_train_step(student, objective, optimizer, teacher=teacher, compile="off")
    v_state, v_metrics = vmap(step, in_dims=(0, None, None))(stacked, batch, tv)
    assert v_metrics["loss"].shape == (2,)
    for i, st in enumerate(states):
        s_state, s_metrics = step(st, batch, tv)
        assert_trees_close(tree_map(lambda t: t[i], v_state), s_state, atol=1e-6, rtol=1e-5)
        assert_trees_close({k: v[i] for k, v in v_metrics.items()}, s_metrics, atol=1e-6, rtol=1e-5)
    # Two different students: the vmapped results must differ between members.
    assert not torch.equal(v_state["params"]["model"]["fc.weight"][0], v_state["params"]["model"]["fc.weight"][1])


def test_gradients_equal_the_notebooks_imperative_loop():
    """fkd's step against the notebook's loop: SeedCNN, logit KD, loss.backward(), torch.optim.SGD."""
    lr = 0.05
    student, params, buffers = build_model("seed_cnn", 10, SIDE)
    teacher, tp, tb = build_model("small_cnn", 10, SIDE, (), widths=(8, 16), seed=1)
    objective = from_config(DistillConfig(method="logit", temperature=2.0, alpha=0.7))
    batch = make_batch(b=6)
    x, y = batch["x"], batch["y"]

    # The notebook: a stateful module, teacher in eval mode under no_grad, backward, optimizer.step.
    net = SeedCNN(10, SIDE)
    net.load_state_dict(params, strict=True)
    net.train()
    teacher_net = SmallCNN(10, (8, 16), batch_norm=True)
    teacher_net.load_state_dict({**tp, **tb}, strict=True)
    teacher_net.eval()
    sgd = torch.optim.SGD(net.parameters(), lr=lr)
    with torch.no_grad():
        teacher_logits = teacher_net(x)[0]
    student_logits = net(x)[0]
    loss = blended_distillation_loss(student_logits, teacher_logits, y)
    sgd.zero_grad()
    loss.backward()
    module_grads = {k: p.grad.detach().clone() for k, p in net.named_parameters()}
    sgd.step()

    # fkd: torch.func.grad of the objective...
    t_logits, _, _ = teacher.apply(tp, tb, x, train=False)

    def objective_loss(p):
        logits, feats, _ = student.apply(p, buffers, x, train=True)
        inputs = TermInputs(logits, feats, y, t_logits, {}, None, torch.zeros((), dtype=torch.int64))
        return objective({}, {}, inputs)[0]

    func_grads = torch.func.grad(objective_loss)(params)
    assert func_grads.keys() == module_grads.keys()
    for k in module_grads:
        torch.testing.assert_close(func_grads[k], module_grads[k], atol=1e-6, rtol=1e-5, msg=k)

    # ...and the whole step with fkd.optim.sgd: grads equal => updates equal.
    optimizer = optim.sgd(lr)
    step = make_train_step(student, objective, optimizer, teacher=teacher, compile="off")
    new_state, metrics = step(init_train_state(params, buffers, optimizer), batch, {"params": tp, "buffers": tb})
    torch.testing.assert_close(metrics["loss"], loss.detach(), atol=1e-6, rtol=1e-6)
    for k, p in net.named_parameters():
        torch.testing.assert_close(new_state["params"]["model"][k], p.detach(), atol=1e-6, rtol=1e-6, msg=k)
        assert not torch.equal(new_state["params"]["model"][k], params[k]), k


def test_non_finite_step_keeps_the_state_and_records_the_first_bad_index(setup):
    step = eager_step(setup)
    tv = setup["teacher_vars"]
    good, nan = make_batch(seed=0), make_batch(seed=1)
    nan["x"] = nan["x"].clone()
    nan["x"][0, 0, 0, 0] = float("nan")

    s1, m1 = step(setup["state"], good, tv)
    assert bool(m1["finite"]) and s1["bad_step"] == -1

    s2, m2 = step(s1, nan, tv)
    assert m2["finite"].dtype == torch.bool and not bool(m2["finite"])
    assert not torch.isfinite(m2["loss"])
    for key in ("params", "opt_state", "buffers", "frozen"):
        assert_trees_equal(s2[key], s1[key])
    assert s2["step"] == 2
    assert s2["bad_step"] == 1  # the index of the bad step (s1 had done step 0)

    s3, m3 = step(s2, good, tv)
    assert bool(m3["finite"])
    assert not torch.equal(s3["params"]["model"]["fc.weight"], s2["params"]["model"]["fc.weight"])
    s4, m4 = step(s3, nan, tv)
    assert not bool(m4["finite"])
    assert_trees_equal(s4["params"], s3["params"])
    assert s3["bad_step"] == 1 and s4["bad_step"] == 1  # the first bad index is kept
    assert s4["step"] == 4


def test_huge_learning_rate_is_caught_as_non_finite():
    student, params, buffers = build_model("small_cnn", 10, SIDE, (), widths=(4, 8), batch_norm=False)
    optimizer = optim.sgd(1e38)
    step = make_train_step(student, from_weights({"ce": 1.0}), optimizer, compile="off")
    state = init_train_state(params, buffers, optimizer)
    batch = make_batch()
    finite = []
    for _ in range(4):
        new_state, metrics = step(state, batch)
        finite.append(bool(metrics["finite"]))
        if not finite[-1]:
            assert_trees_equal(new_state["params"], state["params"])
            assert_trees_equal(new_state["opt_state"], state["opt_state"])
        state = new_state
    assert False in finite
    first_bad = finite.index(False)
    assert state["bad_step"] == first_bad
    assert all(torch.isfinite(t).all() for t in tree_leaves(state["params"]))


def test_frozen_params_pass_through_and_only_params_change():
    """A linear probe: the backbone is frozen (and BatchNorm in eval mode), only the head is trained."""
    student, params, buffers = build_model("small_cnn", 10, SIDE, (), widths=(4, 8), batch_norm=True)
    head = {k: v for k, v in params.items() if k.startswith("fc.")}
    frozen = {k: v for k, v in params.items() if not k.startswith("fc.")}
    optimizer = optim.sgd(0.5, momentum=0.9)
    state = init_train_state(head, buffers, optimizer, frozen=frozen)
    objective = from_weights({"ce": 1.0})
    step = make_train_step(student, objective, optimizer, train_mode=False, compile="off")
    batch = make_batch()
    frozen_snap, buf_snap = snapshot(frozen), snapshot(buffers)
    new_state, metrics = step(state, batch)
    assert_untouched(frozen_snap)
    assert_untouched(buf_snap)
    assert new_state["frozen"].keys() == frozen.keys()
    # Passed through as is (eagerly the very same tensors: a frozen backbone is never copied per step).
    assert all(new_state["frozen"][k] is frozen[k] for k in frozen)
    assert_trees_equal(new_state["buffers"], buffers)  # eval-mode BatchNorm: running stats unchanged
    assert new_state["params"]["model"].keys() == head.keys()
    assert all(not torch.equal(new_state["params"]["model"][k], head[k]) for k in head)
    # The optimizer only tracks the trainable head.
    assert len(tree_leaves(new_state["opt_state"])) == len(head) + 1  # momentum per head tensor + count
    # The loss really used the frozen backbone: the same as applying the full weights in eval mode.
    logits, _, _ = student.apply({**frozen, **head}, buffers, batch["x"], train=False)
    torch.testing.assert_close(metrics["loss"], F.cross_entropy(logits, batch["y"]))


def test_eval_step_logits_and_correct_count(setup):
    student, state = setup["student"], setup["state"]
    params, buffers = state["params"]["model"], state["buffers"]
    batch = make_batch(b=8, seed=3)
    logits, _, _ = student.apply(params, buffers, batch["x"], train=False)
    # Labels right for the first five samples and wrong for the rest.
    y = logits.argmax(dim=-1).clone()
    y[5:] = (y[5:] + 1) % 10
    out = make_eval_step(student)(params, buffers, batch["x"], y)
    torch.testing.assert_close(out["logits"], logits)
    assert isinstance(out["correct"], torch.Tensor) and out["correct"].dtype == torch.int64
    assert out["correct"] == 5
    assert out["correct"] == (out["logits"].argmax(dim=1) == y).sum()


def test_cached_teacher_outputs_give_the_same_step(setup):
    state, tv, batch = setup["state"], setup["teacher_vars"], make_batch()
    t_logits, t_feats, _ = setup["teacher"].apply(tv["params"], tv["buffers"], batch["x"], train=False)
    cached = {**batch, "teacher_logits": t_logits, "teacher_features": t_feats}
    live_state, live_metrics = eager_step(setup)(state, batch, tv)
    no_teacher = make_train_step(setup["student"], setup["objective"], setup["optimizer"], compile="off")
    cached_state, cached_metrics = no_teacher(state, cached)
    assert_trees_close(cached_state, live_state, atol=1e-6)
    assert_trees_close(cached_metrics, live_metrics, atol=1e-6)
    with pytest.raises(ValueError, match="teacher"):
        no_teacher(state, batch)


def test_metrics_are_tensors_and_the_step_never_syncs_with_the_host(setup):
    def host_sync(*args, **kwargs):
        raise AssertionError("the step synchronised with the host")

    step = eager_step(setup)
    syncs = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")
    with mock.patch.multiple(torch.Tensor, **{name: host_sync for name in syncs}):
        with pytest.raises(AssertionError):  # the patch is live
            bool(torch.ones(()))
        new_state, metrics = step(setup["state"], make_batch(), setup["teacher_vars"])
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in metrics.values())
    assert all(isinstance(t, torch.Tensor) for t in tree_leaves(new_state))
    assert metrics["correct"].dtype == torch.int64 and metrics["count"] == 4
    assert metrics["finite"].dtype == torch.bool
    assert all(not v.requires_grad for v in metrics.values())


# --- no module hooks -------------------------------------------------------------------------------

HOOK_REGISTRARS = (
    "register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
    "register_full_backward_pre_hook", "register_backward_hook",
)
GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
    "_global_backward_pre_hooks",
)
# The hook-based imperative baseline that fkd's benchmark compares against; nothing else may use hooks.


def assert_no_hooks(*modules: nn.Module) -> None:
    for module in modules:
        for name, sub in module.named_modules():
            for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
                assert not getattr(sub, attr), f"{name or type(module).__name__} has {attr}"
    for attr in GLOBAL_HOOK_DICTS:
        assert not getattr(torch.nn.modules.module, attr), attr


def test_feature_distillation_uses_no_module_hooks():
    def refuse(*args, **kwargs):
        raise AssertionError("a module hook was registered")

    module_level = {name: refuse for name in (
        "register_module_forward_hook", "register_module_forward_pre_hook",
        "register_module_full_backward_hook", "register_module_full_backward_pre_hook",
        "register_module_backward_hook",
    )}
    with mock.patch.multiple(nn.Module, **{name: refuse for name in HOOK_REGISTRARS}), \
            mock.patch.multiple(torch.nn.modules.module, **module_level):
        with pytest.raises(AssertionError):  # the patch is live
            nn.ReLU().register_forward_hook(lambda *a: None)
        student, sp, sb = build_model("small_cnn", 10, 32, ("block1",), widths=(4, 8))
        teacher, tp, tb = build_model("resnet18", 10, 32, ("layer1",))
        objective = from_config(DistillConfig(method="feature", student_features=["block1"],
                                              teacher_features=["layer1"]))
        assert objective.weights == {"ce": 0.7, "feature": 0.3}
        regressors, _ = objective.init(Shapes({"block1": (4, 16, 16)}, {"layer1": (64, 8, 8)}))
        optimizer = optim.adam(1e-3)
        state = init_train_state(sp, sb, optimizer, objective_params=regressors)
        step = make_train_step(student, objective, optimizer, teacher=teacher, compile="off")
        new_state, metrics = step(state, make_batch(side=32), {"params": tp, "buffers": tb})
        assert_no_hooks(student.train_template, student.eval_template, teacher.train_template, teacher.eval_template)
    assert bool(metrics["finite"]) and metrics["feature"] > 0


def test_no_source_file_registers_module_hooks():
    root = Path(fkd.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 10
    for path in files:
        text = path.read_text()
        for needle in ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
                       "register_backward_hook", "register_module_forward"):
            assert needle not in text, f"{path.relative_to(root)} uses {needle}"
