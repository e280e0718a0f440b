"""Tests for fkd.models: ``build_model`` -> (template, params, buffers) and ``Model.apply``.

What is checked: the features each architecture returns (names, shapes, values against the plain
module), that ``apply`` is pure (BatchNorm statistics come back as new buffers, the caller's dicts and
tensors are untouched), that the templates own no weights, that initialisation is seeded without
touching the global RNG, and the size helpers.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from fkd.build import load_config
from fkd.errors import ConfigError
from fkd.models import MODELS, build_model, build_module, model_builder, param_count, size_bytes
from fkd.registry import accepted_keywords
from fkd.models.students import SeedCNN, SmallCNN

RESNET18_PARAMS_10_CLASSES = 11_181_642


def images(b: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, side, side, generator=torch.Generator().manual_seed(seed))


def snapshot(tree: dict) -> dict:
    """Clones and ``_version`` counters of a flat dict of tensors, to detect any later mutation."""
    return {k: (v.detach().clone(), v._version) for k, v in tree.items()}


def assert_untouched(tree: dict, snap: dict) -> None:
    assert tree.keys() == snap.keys()
    for k, (clone, version) in snap.items():
        assert tree[k]._version == version, f"{k} was written in place"
        assert torch.equal(tree[k], clone), f"{k} changed"


def module_state(module: nn.Module) -> dict:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@pytest.fixture(scope="module")
def resnet18_fx():
    """resnet18 (10 classes, 32 px) returning two FX features by node name."""
    return build_model("resnet18", 10, 32, ("layer1", "layer2.1.relu"))


@pytest.fixture(scope="module")
def resnet18_twin(resnet18_fx):
    """A plain torchvision resnet18 holding the same weights as ``resnet18_fx``."""
    _, params, buffers = resnet18_fx
    net = torchvision.models.resnet18(num_classes=10)
    net.load_state_dict({**params, **buffers}, strict=True)
    return net


# --- features ------------------------------------------------------------------------------------


def test_seed_cnn_features_at_32px():
    model, params, buffers = build_model("seed_cnn", 10, 32, ("block1", "block2", "block3", "block4"))
    assert buffers == {}  # the notebook's student has no BatchNorm
    assert params["fc1.weight"].shape == (256, 256 * 2 * 2)
    logits, feats, _ = model.apply(params, buffers, images(2, 32), train=False)
    assert logits.shape == (2, 10)
    assert list(feats) == ["block1", "block2", "block3", "block4"]
    assert feats["block1"].shape == (2, 32, 16, 16)
    assert feats["block2"].shape == (2, 64, 8, 8)
    assert feats["block3"].shape == (2, 128, 4, 4)
    assert feats["block4"].shape == (2, 256, 2, 2)


def test_seed_cnn_at_224px_matches_the_notebooks_classifier():
    model, params, buffers = build_model("seed_cnn", 10, 224, ("block4",))
    # The notebook hard-codes Linear(256 * 14 * 14, 256); at 224 px the derived size must equal it.
    assert params["fc1.weight"].shape == (256, 256 * 14 * 14)
    logits, feats, _ = model.apply(params, buffers, images(1, 224), train=False)
    assert logits.shape == (1, 10)
    assert list(feats) == ["block4"]
    assert feats["block4"].shape == (1, 256, 14, 14)


def test_only_requested_features_are_returned():
    model, params, buffers = build_model("seed_cnn", 10, 16, ("block2",))
    _, feats, _ = model.apply(params, buffers, images(1, 16), train=False)
    assert list(feats) == ["block2"]
    model, params, buffers = build_model("seed_cnn", 10, 16)
    _, feats, _ = model.apply(params, buffers, images(1, 16), train=False)
    assert feats == {}


@pytest.mark.parametrize("batch_norm", [True, False])
def test_small_cnn_widths_and_batch_norm(batch_norm):
    names = ("block1", "block2", "block3", "pool")
    model, params, buffers = build_model("small_cnn", 7, 16, names, widths=[4, 8, 16], batch_norm=batch_norm)
    logits, feats, _ = model.apply(params, buffers, images(3, 16), train=False)
    assert logits.shape == (3, 7)
    assert feats["block1"].shape == (3, 4, 8, 8)
    assert feats["block2"].shape == (3, 8, 4, 4)
    assert feats["block3"].shape == (3, 16, 2, 2)
    assert feats["pool"].shape == (3, 16)
    torch.testing.assert_close(feats["pool"], feats["block3"].mean(dim=(2, 3)))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.train_template.modules())
    if batch_norm:
        assert n_bn == 3
        assert {k for k in buffers if k.endswith("running_mean")} == {f"blocks.{i}.1.running_mean" for i in range(3)}
        assert "blocks.0.0.bias" not in params  # a conv followed by BatchNorm needs no bias
    else:
        assert n_bn == 0
        assert buffers == {}
        assert params["blocks.0.0.bias"].shape == (4,)
    assert params["blocks.2.0.weight"].shape == (16, 8, 3, 3)
    assert params["fc.weight"].shape == (7, 16)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_by_name(arch):
    model, params, buffers = build_model(arch, 10, 32)
    logits, feats, _ = model.apply(params, buffers, images(2, 32), train=False)
    assert logits.shape == (2, 10)
    assert feats == {}
    reference = torchvision.models.get_model(arch, num_classes=10)
    assert {k: v.shape for k, v in params.items()} == {k: v.shape for k, v in reference.named_parameters()}
    assert {k: v.shape for k, v in buffers.items()} == {k: v.shape for k, v in reference.named_buffers()}


def test_fx_features_by_node_name_equal_the_modules_intermediates(resnet18_fx, resnet18_twin):
    model, params, buffers = resnet18_fx
    x = images(2, 32)
    logits, feats, _ = model.apply(params, buffers, x, train=False)
    assert list(feats) == ["layer1", "layer2.1.relu"]
    net = resnet18_twin.eval()
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        layer1 = net.layer1(h)
        block = net.layer2[1]
        # "layer2.1.relu" is the first call of that block's ReLU: after conv1 and bn1.
        relu = block.relu(block.bn1(block.conv1(net.layer2[0](layer1))))
        expected_logits = net(x)
    assert feats["layer1"].shape == (2, 64, 8, 8)
    assert feats["layer2.1.relu"].shape == (2, 128, 4, 4)
    torch.testing.assert_close(feats["layer1"], layer1)
    torch.testing.assert_close(feats["layer2.1.relu"], relu)
    torch.testing.assert_close(logits, expected_logits)


def test_unknown_fx_node_raises_config_error_listing_valid_names():
    with pytest.raises(ConfigError) as err:
        build_model("resnet18", 10, 32, ("layer1", "layer9"))
    msg = str(err.value)
    assert "layer9" in msg
    for valid in ("layer1", "layer2.1.relu", "layer4", "avgpool"):
        assert valid in msg


def test_unknown_student_feature_raises_config_error_listing_valid_names():
    with pytest.raises(ConfigError) as err:
        build_model("seed_cnn", 10, 32, ("block5",))
    msg = str(err.value)
    assert "block5" in msg
    assert all(f"block{i}" in msg for i in range(1, 5))
    with pytest.raises(ConfigError, match="pool"):
        build_model("small_cnn", 10, 16, ("layer1",), widths=[4, 8])


def test_unknown_arch_raises_config_error():
    with pytest.raises(ConfigError, match="resnet19"):
        build_model("resnet19", 10, 32)


def test_registered_models_come_first_then_torchvision_and_unknown_names_get_close_matches():
    from fkd.models.cifar import RESNETS, WIDE_RESNETS

    assert MODELS.names() == ("seed_cnn", "small_cnn", *RESNETS, *WIDE_RESNETS)
    assert model_builder("small_cnn") is MODELS.get("small_cnn")
    assert accepted_keywords(model_builder("small_cnn")) == ("num_classes", "image_size", "widths", "batch_norm")
    assert accepted_keywords(model_builder("seed_cnn")) == ("num_classes", "image_size")
    assert accepted_keywords(model_builder("resnet18")) == ("num_classes", "image_size", "weights")
    with pytest.raises(ConfigError, match=r"^teacher.arch = 'smal_cnn' is not a known model; "
                                          r"did you mean 'small_cnn' or 'seed_cnn'\?$"):
        model_builder("smal_cnn", key="teacher.arch")
    with pytest.raises(ConfigError, match="use seed_cnn, small_cnn, resnet8, .*, wrn_40_2 or a torchvision classifier"):
        model_builder("zzzz")
    with pytest.raises(ConfigError, match="student.arch = 'resnet81' is not a known model; "
                                          "did you mean 'resnet8' or 'resnet18'"):
        load_config(None, ['student.arch="resnet81"'])


def test_each_builder_gets_only_the_options_it_takes():
    options = dict(widths=[4, 8], batch_norm=False, weights="none")
    assert isinstance(build_module("seed_cnn", 10, 32, **options), SeedCNN)
    small = build_module("small_cnn", 10, 32, **options)
    assert [b[0].out_channels for b in small.blocks] == [4, 8] and not any(
        isinstance(m, nn.BatchNorm2d) for m in small.modules())
    assert isinstance(build_module("resnet18", 10, 32, **options), torchvision.models.ResNet)


def test_a_registered_model_is_built_by_name_from_a_config():
    @MODELS.register("test_tiny")
    def tiny(num_classes: int, image_size: int, *, widths) -> nn.Module:
        return SmallCNN(num_classes, widths[:1], batch_norm=False)

    try:
        cfg = load_config(None, ['student.arch="test_tiny"', "student.widths=[3]"])
        model, params, _ = build_model(cfg.student.arch, 5, 16, ("block1",), widths=cfg.student.widths)
        assert params["blocks.0.0.weight"].shape == (3, 3, 3, 3) and model.arch == "test_tiny"
    finally:
        MODELS._entries.pop("test_tiny")


# --- apply is pure --------------------------------------------------------------------------------


def test_train_apply_returns_new_running_stats_and_mutates_nothing():
    model, params, buffers = build_model("small_cnn", 10, 16, ("block2",), widths=[4, 8], batch_norm=True)
    x = images(4, 16)
    p_snap, b_snap, x_snap = snapshot(params), snapshot(buffers), snapshot({"x": x})
    logits, feats, new_buffers = model.apply(params, buffers, x, train=True)
    assert_untouched(params, p_snap)
    assert_untouched(buffers, b_snap)
    assert_untouched({"x": x}, x_snap)
    assert new_buffers.keys() == buffers.keys()
    assert all(new_buffers[k] is not buffers[k] for k in buffers)

    # The same step with a stateful module: its running stats after one train-mode forward.
    net = SmallCNN(10, (4, 8), batch_norm=True).train()
    net.load_state_dict({**params, **buffers})
    with torch.no_grad():
        ref_logits, ref_feats = net(x)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(feats["block2"], ref_feats["block2"])
    for k, v in net.named_buffers():
        torch.testing.assert_close(new_buffers[k], v, msg=k)
    assert not torch.equal(new_buffers["blocks.0.1.running_mean"], buffers["blocks.0.1.running_mean"])
    assert new_buffers["blocks.0.1.num_batches_tracked"] == 1
    assert buffers["blocks.0.1.num_batches_tracked"] == 0


def test_eval_apply_leaves_buffers_unchanged():
    model, params, buffers = build_model("small_cnn", 10, 16, (), widths=[4, 8], batch_norm=True)
    # Non-trivial running stats, so eval mode visibly uses them.
    buffers = {k: (v + 0.5 if v.is_floating_point() else v) for k, v in buffers.items()}
    x = images(4, 16)
    p_snap, b_snap = snapshot(params), snapshot(buffers)
    logits, _, new_buffers = model.apply(params, buffers, x, train=False)
    assert_untouched(params, p_snap)
    assert_untouched(buffers, b_snap)
    assert new_buffers.keys() == buffers.keys()
    for k in buffers:
        assert torch.equal(new_buffers[k], buffers[k])
    net = SmallCNN(10, (4, 8), batch_norm=True).eval()
    net.load_state_dict({**params, **buffers})
    with torch.no_grad():
        torch.testing.assert_close(logits, net(x)[0])


@pytest.mark.parametrize("train", [False, True])
def test_apply_equals_torchvision_resnet18_forward(resnet18_fx, resnet18_twin, train):
    model, params, buffers = resnet18_fx
    x = images(3, 32, seed=1)
    logits, _, new_buffers = model.apply(params, buffers, x, train=train)
    net = resnet18_twin
    net.load_state_dict({**params, **buffers})  # reset its running stats: the fixture is shared
    net.train(train)
    with torch.no_grad():
        expected = net(x)
    torch.testing.assert_close(logits, expected)
    for k, v in net.named_buffers():
        torch.testing.assert_close(new_buffers[k], v, msg=k)


def test_apply_equals_seed_cnn_forward():
    model, params, buffers = build_model("seed_cnn", 10, 32, ("block3",))
    net = SeedCNN(10, 32)
    net.load_state_dict({**params, **buffers}, strict=True)
    x = images(2, 32)
    logits, feats, _ = model.apply(params, buffers, x, train=True)
    with torch.no_grad():
        ref_logits, ref_feats = net(x)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(feats["block3"], ref_feats["block3"])


# --- templates, weights, seeds --------------------------------------------------------------------


def test_templates_hold_no_weights_and_params_are_detached(resnet18_fx):
    for model, params, buffers in (resnet18_fx, build_model("small_cnn", 10, 16, ("pool",), widths=[4, 8])):
        for template in (model.train_template, model.eval_template):
            tensors = list(template.parameters()) + list(template.buffers())
            assert tensors and all(t.is_meta for t in tensors)
        assert model.train_template.training and not model.eval_template.training
        for t in list(params.values()) + list(buffers.values()):
            assert not t.is_meta and t.device.type == "cpu"
            assert not t.requires_grad and t.grad_fn is None


def test_same_seed_same_params_different_seed_different_params():
    _, a, a_buf = build_model("small_cnn", 10, 16, (), widths=[4, 8], seed=3)
    _, b, b_buf = build_model("small_cnn", 10, 16, (), widths=[4, 8], seed=3)
    _, c, _ = build_model("small_cnn", 10, 16, (), widths=[4, 8], seed=4)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a_buf[k], b_buf[k]) for k in a_buf)
    for k in ("blocks.0.0.weight", "blocks.1.0.weight", "fc.weight", "fc.bias"):
        assert not torch.equal(a[k], c[k]), k


def test_build_model_leaves_the_global_rng_alone():
    torch.manual_seed(1234)
    expected = torch.rand(5)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    build_model("seed_cnn", 10, 16)
    build_model("resnet18", 10, 32, ("layer1",))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(5), expected)


def test_param_count_and_size_bytes_of_resnet18(resnet18_fx):
    _, params, buffers = resnet18_fx
    assert param_count(params) == RESNET18_PARAMS_10_CLASSES
    assert param_count(params) == sum(p.numel() for p in torchvision.models.resnet18(num_classes=10).parameters())
    assert size_bytes(params) == 4 * RESNET18_PARAMS_10_CLASSES
    buffer_bytes = sum(b.numel() * b.element_size() for b in buffers.values())
    # running_mean / running_var in float32, num_batches_tracked in int64 (8 bytes each)
    n_bn = sum(k.endswith("num_batches_tracked") for k in buffers)
    assert n_bn == 20
    assert buffer_bytes == 8 * n_bn + 4 * sum(b.numel() for k, b in buffers.items() if not k.endswith("tracked"))
    assert size_bytes(params, buffers) == 4 * RESNET18_PARAMS_10_CLASSES + buffer_bytes


def test_model_with_auxiliary_heads_applies_in_both_modes():
    # googlenet's auxiliary classifiers are unused by the logits: FX prunes them, fkd skips their weights
    model, params, buffers = build_model("googlenet", 5, 64, ["inception3a"])
    assert any(k.startswith("aux1.") for k in params) and model.pruned
    x = torch.randn(2, 3, 64, 64)
    for train in (True, False):
        logits, feats, new_buffers = model.apply(params, buffers, x, train=train)
        assert logits.shape == (2, 5) and feats["inception3a"].shape[:2] == (2, 256)
        assert set(new_buffers) == set(buffers)
