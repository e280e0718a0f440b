"""channels_last in the step: same losses and weights as the default layout, and the layout is kept."""

from __future__ import annotations

import pytest
import torch

from fkd.models.functional import feature_shapes
from fkd.models import build_model
from fkd.objective import from_weights
from fkd.terms import Shapes
from fkd.optim import adam
from fkd.pytree import tree_leaves
from fkd.step import init_train_state, make_train_step, to_channels_last


pytestmark = pytest.mark.usefixtures("one_thread")


def test_to_channels_last_converts_only_4d_tensors_and_is_free_when_done():
    tree = {"w": torch.randn(4, 3, 3, 3), "b": torch.randn(4), "n": [torch.randn(2, 3, 5, 5)]}
    out = to_channels_last(tree)
    assert out["w"].is_contiguous(memory_format=torch.channels_last) and not out["w"].is_contiguous()
    assert out["b"] is tree["b"]
    assert torch.equal(out["n"][0], tree["n"][0])
    again = to_channels_last(out)
    assert again["w"] is out["w"]  # already channels_last: no copy


@pytest.mark.parametrize("converted_state", [True, False])
def test_channels_last_step_gives_the_same_losses_on_cpu(converted_state):
    torch.manual_seed(0)
    student, sp, sb = build_model("small_cnn", 4, 16, ("block2",), widths=(4, 8), seed=0)
    teacher, tp, tb = build_model("resnet18", 4, 16, ("layer1",), seed=1)
    obj = from_weights({"ce": 0.7, "feature": 0.3, "logit": 0.5}, pairs=(("block2", "layer1"),))
    regs, _ = obj.init(Shapes(feature_shapes(student, sp, sb, 16, "cpu"), feature_shapes(teacher, tp, tb, 16, "cpu")))
    opt = adam(1e-2)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    teacher_vars = {"params": tp, "buffers": tb}

    def run(channels_last: bool):
        state, tv = init_train_state(sp, sb, opt, objective_params=regs), teacher_vars
        if channels_last and converted_state:
            state, tv = to_channels_last(state), to_channels_last(teacher_vars)
        step = make_train_step(student, obj, opt, teacher=teacher, channels_last=channels_last, compile="off")
        losses = []
        for _ in range(3):
            state, metrics = step(state, {"x": x, "y": y}, tv)
            losses.append(metrics["loss"])
        return torch.stack(losses), state

    plain_losses, plain = run(False)
    cl_losses, cl = run(True)
    torch.testing.assert_close(cl_losses, plain_losses, atol=1e-5, rtol=1e-5)
    for a, b in zip(tree_leaves(cl["params"]), tree_leaves(plain["params"])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if converted_state:  # the step keeps the layout it was given: no per-step conversion copies
        conv = [p for p in tree_leaves(cl["params"]["model"]) if p.ndim == 4]
        assert conv and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv)
