"""A term's own state in the train state: threaded by the step, kept by the non-finite guard, stacked and
vmapped per student, and fed the step's random key -- with no change to step.py for this term."""

from __future__ import annotations

import attrs
import torch
from torch.func import vmap

from fkd import optim, prng
from fkd.models import build_model
from fkd.objective import build
from fkd.pytree import tree_leaves, tree_map
from fkd.step import init_train_state, make_train_step
from fkd.terms import Shapes, Term, TERMS, hyper, positive, register_term

SIDE, N, K = 16, 32, 10


if "test_bank" not in TERMS:

    @register_term("test_bank")
    @attrs.frozen
    class Bank(Term):
        """A per-example bank of predictions, a learnable scale, and a record of the keys it was given."""

        consumes = frozenset({"student_logits", "idx", "key"})
        samples: int = hyper(2, positive, help="random bank rows per step")

        def init(self, shapes, generator):
            bank = torch.rand(shapes.num_examples, shapes.num_classes, generator=generator)
            return {"scale": torch.ones(())}, {"bank": bank, "last_key": torch.zeros((), dtype=torch.int64)}

        def apply(self, params, state, inputs):
            p = torch.softmax(params["scale"] * inputs.student_logits, dim=-1)
            drawn = state["bank"][prng.randint(inputs.key, (self.samples,), state["bank"].shape[0])]
            loss = (p - state["bank"][inputs.idx]).pow(2).mean() + 0.1 * drawn.mean() * p.mean()
            bank = state["bank"].index_copy(0, inputs.idx, p.detach())
            return loss, {"bank": bank, "last_key": inputs.key}


def setup(seed=0):
    student, params, buffers = build_model("small_cnn", K, SIDE, (), widths=(4,), seed=seed)
    objective = build({"ce": {"weight": 1.0}, "test_bank": {"weight": 1.0}})
    obj_params, obj_state = objective.init(Shapes(num_classes=K, num_examples=N), seed=seed)
    optimizer = optim.adam(1e-2)
    state = init_train_state(params, buffers, optimizer, objective_params=obj_params, objective_state=obj_state,
                             seed=seed)
    return make_train_step(student, objective, optimizer, compile="off"), state


def batch(seed=0, idx=(0, 5, 9, 31)):
    g = torch.Generator().manual_seed(seed)
    b = len(idx)
    return {"x": torch.randn(b, 3, SIDE, SIDE, generator=g), "y": torch.randint(0, K, (b,), generator=g),
            "idx": torch.tensor(idx)}


def test_the_step_threads_the_state_and_trains_the_params():
    step, state = setup()
    new, metrics = step(state, batch())
    assert set(metrics) >= {"ce", "test_bank", "loss"}
    bank, old = new["objective"]["test_bank"]["bank"], state["objective"]["test_bank"]["bank"]
    changed = (bank != old).any(dim=1)
    assert changed[[0, 5, 9, 31]].all() and not changed[[1, 2, 3]].any()  # only the batch's rows
    assert new["params"]["objective"]["test_bank"]["scale"] != 1.0
    # The term saw the step's key: fold_in(run key, step count), with no global RNG involved.
    assert new["objective"]["test_bank"]["last_key"] == prng.fold_in(prng.key_from_seed(0), 0)
    newer, _ = step(new, batch(1))
    assert newer["objective"]["test_bank"]["last_key"] == prng.fold_in(prng.key_from_seed(0), 1)


def test_a_non_finite_step_keeps_the_previous_objective_state():
    step, state = setup()
    good, _ = step(state, batch())
    nan = batch(1)
    nan["x"][0, 0, 0, 0] = float("nan")
    kept, metrics = step(good, nan)
    assert not bool(metrics["finite"])
    for a, b in zip(tree_leaves(kept["objective"]), tree_leaves(good["objective"])):
        assert torch.equal(a, b)
    for a, b in zip(tree_leaves(kept["params"]), tree_leaves(good["params"])):
        assert torch.equal(a, b)


def test_vmap_over_stacked_students_equals_separate_steps():
    step, s0 = setup(0)
    _, s1 = setup(1)
    stacked = tree_map(lambda a, b: torch.stack([a, b]), s0, s1)
    v_state, v_metrics = vmap(step, in_dims=(0, None))(stacked, batch())
    assert not torch.equal(stacked["key"][0], stacked["key"][1])  # each student draws its own numbers
    for i, single in enumerate((s0, s1)):
        s_state, s_metrics = step(single, batch())
        for a, b in zip(tree_leaves(tree_map(lambda t: t[i], v_state)), tree_leaves(s_state)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(v_metrics["loss"][i], s_metrics["loss"], atol=1e-6, rtol=1e-5)
