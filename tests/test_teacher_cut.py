"""A teacher whose logits are unused runs only up to its last feature, with the same results."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fkd.models.functional import feature_shapes
from fkd.models import build_model
from fkd.objective import from_weights
from fkd.terms import Shapes
from fkd.optim import adam
from fkd.pytree import tree_leaves
from fkd.step import init_train_state, make_train_step


pytestmark = pytest.mark.usefixtures("one_thread")


class CountConvs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.convs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.convs += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("names, convs", [
    (("layer1",), 1 + 4),                       # stem + layer1's two blocks
    (("layer2", "layer1", "layer2"), 1 + 4 + 5),  # + layer2 (four 3x3 convs and the 1x1 downsample)
    (("layer1.1.conv1",), 1 + 3),
])
def test_features_fn_stops_after_the_last_feature_and_matches_apply(names, convs):
    teacher, tp, tb = build_model("resnet18", 10, 32, names, seed=1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, expected, _ = teacher.apply(tp, tb, x, train=False)
        with CountConvs() as counter:
            features = teacher.features_fn()(tp, tb, x)
    assert counter.convs == convs  # the full ResNet-18 forward runs 20
    assert list(features) == list(dict.fromkeys(names))
    for name in features:
        assert torch.equal(features[name], expected[name])


def test_fkd_students_still_run_their_whole_forward():
    student, sp, sb = build_model("seed_cnn", 10, 32, ("block2",), seed=0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, expected, _ = student.apply(sp, sb, x, train=False)
        assert torch.equal(student.features_fn()(sp, sb, x)["block2"], expected["block2"])


def test_feature_step_with_the_cut_teacher_equals_the_step_on_full_teacher_outputs():
    student, sp, sb = build_model("small_cnn", 4, 16, ("block1", "block2"), widths=(4, 8), seed=0)
    teacher, tp, tb = build_model("resnet18", 4, 16, ("layer1",), seed=1)
    obj = from_weights({"ce": 0.7, "feature": 0.3, "attention": 2.0}, pairs=(("block1", "layer1"), ("block2", "layer1")))
    regs, _ = obj.init(Shapes(feature_shapes(student, sp, sb, 16, "cpu"), feature_shapes(teacher, tp, tb, 16, "cpu")))
    opt = adam(1e-2)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    tv = {"params": tp, "buffers": tb}
    live = make_train_step(student, obj, opt, teacher=teacher, compile="off")
    given = make_train_step(student, obj, opt, compile="off")
    with torch.no_grad():
        t_logits, t_feats, _ = teacher.apply(tp, tb, x, train=False)  # the whole forward
    state_a = state_b = init_train_state(sp, sb, opt, objective_params=regs)
    for _ in range(2):
        state_a, metrics_a = live(state_a, {"x": x, "y": y}, tv)
        state_b, metrics_b = given(state_b, {"x": x, "y": y, "teacher_logits": t_logits, "teacher_features": t_feats})
    assert torch.equal(metrics_a["loss"], metrics_b["loss"])
    for a, b in zip(tree_leaves(state_a), tree_leaves(state_b)):
        assert torch.equal(a, b)
