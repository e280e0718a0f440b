"""fkd.models.cifar: the CIFAR benchmark networks (RepDistiller's ResNets and WRNs) as fkd models.

What is checked: parameter counts against the published ones, the named features and their shapes at
32 px, that ``Model.apply`` (functional, through ``build_model``) equals the module's own forward in both
modes with the caller's tensors untouched, and that it vmaps over stacked parameter sets.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

from fkd.build import load_config
from fkd.errors import ConfigError
from fkd.models import MODELS, build_model, build_module
from fkd.models.cifar import CifarResNet, WideResNet

# Exact counts at 100 classes (what these definitions give), and the values the papers print: Tian et al.
# (ICLR 2020, CRD) and Zhao et al. (CVPR 2022, DKD) list resnet8x4 1.23 M, resnet32x4 7.43 M, wrn_16_2
# 0.70 M, wrn_40_2 2.26 M, resnet20 0.28 M, resnet56 0.86 M, resnet110 1.74 M.
PARAMS_100_CLASSES = {
    "resnet20": (278_324, 0.28e6),
    "resnet56": (861_620, 0.86e6),
    "resnet110": (1_736_564, 1.74e6),
    "resnet8x4": (1_233_540, 1.23e6),
    "resnet32x4": (7_433_860, 7.43e6),
    "wrn_16_2": (703_284, 0.70e6),
    "wrn_40_2": (2_255_156, 2.26e6),
}


def images(b: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", sorted(PARAMS_100_CLASSES))
def test_parameter_counts_match_the_published_ones(arch):
    exact, published = PARAMS_100_CLASSES[arch]
    count = sum(p.numel() for p in build_module(arch, 100, 32).parameters())
    assert count == exact
    assert abs(count - published) / published < 0.01


def test_every_benchmark_network_is_registered():
    for arch in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                 "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"):
        assert arch in MODELS, arch


@pytest.mark.parametrize("arch, widths", [
    ("resnet8x4", (32, 64, 128, 256)),
    ("resnet20", (16, 16, 32, 64)),
    ("wrn_16_2", (16, 32, 64, 128)),
])
def test_named_features_and_their_shapes_at_32px(arch, widths):
    model, params, buffers = build_model(arch, 100, 32, ("stem", "stage1", "stage2", "stage3", "embedding"))
    logits, feats, _ = model.apply(params, buffers, images(2, 32), train=False)
    assert logits.shape == (2, 100)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "stem": (2, widths[0], 32, 32),
        "stage1": (2, widths[1], 32, 32),
        "stage2": (2, widths[2], 16, 16),
        "stage3": (2, widths[3], 8, 8),
        "embedding": (2, widths[3]),
    }
    # "embedding" is exactly what the classifier reads
    torch.testing.assert_close(logits, feats["embedding"] @ params["fc.weight"].T + params["fc.bias"])


def test_resnet_preact_features_are_the_stage_outputs_before_their_relu():
    model, params, buffers = build_model("resnet8x4", 10, 32, ("stage2", "stage2_preact", "stage3", "stage3_preact"))
    _, feats, _ = model.apply(params, buffers, images(2, 32), train=True)
    assert (feats["stage3_preact"] < 0).any()  # really before the ReLU
    for stage in ("stage2", "stage3"):
        torch.testing.assert_close(feats[stage], torch.relu(feats[f"{stage}_preact"]))


def test_wrn_embedding_is_the_activated_pooled_stage3():
    model, params, buffers = build_model("wrn_16_2", 10, 32, ("stage3", "embedding"))
    _, feats, _ = model.apply(params, buffers, images(2, 32), train=False)
    bn = torch.nn.functional.batch_norm(feats["stage3"], buffers["bn1.running_mean"], buffers["bn1.running_var"],
                                        params["bn1.weight"], params["bn1.bias"], training=False)
    torch.testing.assert_close(feats["embedding"], torch.relu(bn).mean(dim=(2, 3)))


def test_unknown_feature_names_the_valid_ones():
    with pytest.raises(ConfigError, match="'layer2' is not a feature of wrn_16_2; valid names: stem, stage1"):
        build_model("wrn_16_2", 10, 32, ("layer2",))


def test_any_image_size_works_thanks_to_global_pooling():
    model, params, buffers = build_model("resnet8", 10, 40, ("stage3", "embedding"))
    logits, feats, _ = model.apply(params, buffers, images(2, 40), train=False)
    assert logits.shape == (2, 10) and feats["stage3"].shape == (2, 64, 10, 10) and feats["embedding"].shape == (2, 64)


def test_impossible_depths_are_refused():
    with pytest.raises(ValueError, match="depth 6n \\+ 2"):
        CifarResNet(10, (16, 16, 32, 64))
    with pytest.raises(ValueError, match="depth 6n \\+ 4"):
        WideResNet(18, 2)


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1"])
@pytest.mark.parametrize("train", [False, True])
def test_apply_equals_the_module_forward_and_mutates_nothing(arch, train):
    model, params, buffers = build_model(arch, 10, 32, ("stage2", "embedding"))
    net = build_module(arch, 10, 32)
    net.load_state_dict({**params, **buffers}, strict=True)
    net.train(train)
    x = images(3, 32, seed=1)
    before = {k: v.clone() for k, v in {**params, **buffers}.items()}
    logits, feats, new_buffers = model.apply(params, buffers, x, train=train)
    with torch.no_grad():
        ref_logits, ref_feats = net(x)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(feats["stage2"], ref_feats["stage2"])
    torch.testing.assert_close(feats["embedding"], ref_feats["embedding"])
    for k, v in net.named_buffers():  # the running statistics the stateful module ends with
        torch.testing.assert_close(new_buffers[k], v, msg=k)
    for k, v in {**params, **buffers}.items():
        assert torch.equal(v, before[k]), f"{k} changed"


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1"])
def test_train_apply_vmaps_over_stacked_parameter_sets(arch):
    # fkd sweep stacks students' states and vmaps the step over them.
    model, params_a, buffers_a = build_model(arch, 10, 16, ("stage3",), seed=0)
    _, params_b, buffers_b = build_model(arch, 10, 16, ("stage3",), seed=1)
    stack = lambda a, b: {k: torch.stack([a[k], b[k]]) for k in a}  # noqa: E731
    x = images(4, 16)

    def forward(params, buffers):
        logits, feats, new_buffers = model.apply(params, buffers, x, train=True)
        return logits, feats["stage3"], new_buffers

    logits, stage3, new_buffers = vmap(forward)(stack(params_a, params_b), stack(buffers_a, buffers_b))
    for i, (params, buffers) in enumerate(((params_a, buffers_a), (params_b, buffers_b))):
        ref_logits, ref_stage3, ref_buffers = forward(params, buffers)
        torch.testing.assert_close(logits[i], ref_logits)
        torch.testing.assert_close(stage3[i], ref_stage3)
        for k in ref_buffers:
            torch.testing.assert_close(new_buffers[k][i], ref_buffers[k], msg=k)


def test_gradients_reach_every_parameter():
    model, params, buffers = build_model("wrn_16_1", 10, 16)

    def loss(p):
        return model.apply(p, buffers, images(2, 16), train=True)[0].square().mean()

    grads = torch.func.grad(loss)(params)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_a_config_can_name_them():
    cfg = load_config(None, ['student.arch="resnet8x4"', 'teacher.arch="resnet32x4"'])
    assert (cfg.student.arch, cfg.teacher.arch) == ("resnet8x4", "resnet32x4")
    with pytest.raises(ConfigError, match="did you mean 'resnet8x4'"):
        load_config(None, ['student.arch="resnet8x5"'])
