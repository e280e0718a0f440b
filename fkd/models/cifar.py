"""The CIFAR-style networks of the distillation benchmark: ResNet-8 ... ResNet-110, ResNet-8x4/32x4, WRN-d-k.

The CIFAR-100 table every distillation paper reports (Tian et al., ICLR 2020, "Contrastive Representation
Distillation", and its RepDistiller code; Zhao et al., CVPR 2022, mdistiller) uses these networks, which
torchvision does not have. They follow RepDistiller's ``models/resnet.py`` and ``models/wrn.py`` layer for
layer, so the parameter counts are the published ones (at 100 classes):

=============  ==========  =============  ==========
arch           parameters  arch           parameters
=============  ==========  =============  ==========
resnet20       0.28 M      resnet8x4      1.23 M
resnet56       0.86 M      resnet32x4     7.43 M
resnet110      1.74 M      wrn_16_2       0.70 M
                           wrn_40_2       2.26 M
=============  ==========  =============  ==========

Both families have a 3x3 stem and three stages; stages 2 and 3 halve the resolution (32 -> 16 -> 8 px at
CIFAR's 32 px). RepDistiller pools with ``AvgPool2d(8)``, which is the global mean at 32 px; here the pooling
is global at any size, so ``image_size`` only has to leave stage 3 at least 1 px.

Named features (``forward`` returns them all; ``Model.apply`` keeps the requested ones):

* ``stem``: (B, C0, H, W), the stem's output (RepDistiller's ``feat[0]``);
* ``stage1``, ``stage2``, ``stage3``: (B, Ci, H/2^(i-1), W/2^(i-1)), each stage's output (``feat[1..3]``);
  FitNets' hint layer 2 is ``stage2``, attention transfer uses all three;
* ``stage1_preact`` ... ``stage3_preact``, the features just before a ReLU (the ``preact=True`` features of
  RepDistiller and OFD's authors' code): for a ResNet each stage's output before its last ReLU; for a WRN,
  whose stage outputs are pre-activation already, the next BatchNorm's output on them (the first block of the
  next stage's ``bn1``, the final ``bn1`` after stage 3), which the ReLU then reads -- the BatchNorm whose
  gamma and beta give OFD's margin;
* ``embedding``: (B, D), the pooled vector the final linear classifier reads (``feat[-1]``; CRD, RKD and
  PKT use it).
"""

from __future__ import annotations

import torch
from torch import nn

from fkd.models.students import MODELS


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def _init_like_repdistiller(module: nn.Module) -> None:
    """He-normal convolutions (fan-out, ReLU gain: std sqrt(2 / (k^2 C_out)), He et al. 2015), BatchNorm
    scale 1 and shift 0; linear layers keep PyTorch's default weights, with zero bias (RepDistiller zeroes
    the bias in its WRN and keeps PyTorch's default in its ResNet)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


# --- ResNet (He et al., CVPR 2016, Sec. 4.2: the 6n+2-layer CIFAR ResNets) --------------------------------


class BasicBlock(nn.Module):
    """Post-activation residual block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.

    The shortcut is the identity, or a strided 1x1 conv + BatchNorm when the shape changes (option B of
    He et al.). ``forward(x) -> (out, preact)``: ``preact`` is the sum before the last ReLU.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        preact = out + shortcut
        return self.relu(preact), preact


class CifarResNet(nn.Module):
    """The CIFAR ResNet of depth ``6n + 2``: a 3x3 stem, three stages of ``n`` basic blocks, global
    average pooling and a linear classifier.

    ``widths = (stem, stage1, stage2, stage3)`` channels: ``(16, 16, 32, 64)`` for resnet8 ... resnet110,
    ``(32, 64, 128, 256)`` for the "x4" networks. Parameter names are torchvision's (``conv1``, ``bn1``,
    ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``), which are RepDistiller's too.

    ``forward(x: (B, 3, H, W)) -> (logits (B, classes), {"stem": (B, w0, H, W), "stage1": (B, w1, H, W),
    "stage2": (B, w2, H/2, W/2), "stage3": (B, w3, H/4, W/4), "stage1_preact": ..., "embedding": (B, w3)})``
    """

    feature_names = ("stem", "stage1", "stage2", "stage3", "stage1_preact", "stage2_preact", "stage3_preact",
                     "embedding")

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 >= 8 (8, 14, 20, 32, 44, 56, 110); got {depth}")
        if len(widths) != 4:
            raise ValueError(f"widths are (stem, stage1, stage2, stage3) channels; got {widths}")
        blocks = (depth - 2) // 6
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages = []
        c_in = widths[0]
        for i, c_out in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*(BasicBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1)
                                          for j in range(blocks))))
            c_in = c_out
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[3], num_classes)
        _init_like_repdistiller(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.relu(self.bn1(self.conv1(x)))
        feats = {"stem": x}
        for i, stage in enumerate((self.layer1, self.layer2, self.layer3), start=1):
            for block in stage:
                x, preact = block(x)
            feats[f"stage{i}"] = x
            feats[f"stage{i}_preact"] = preact
        embedding = x.mean(dim=(2, 3))
        feats["embedding"] = embedding
        return self.fc(embedding), feats


# --- Wide ResNet (Zagoruyko & Komodakis, BMVC 2016) ----------------------------------------------------


class WideBlock(nn.Module):
    """Pre-activation residual block: ``conv(relu(bn(conv(relu(bn(x)))))) + shortcut``.

    When the shape changes, the shortcut is a strided 1x1 conv of the activated input ``relu(bn1(x))``;
    otherwise it is ``x`` itself (as in the authors' and RepDistiller's code). No dropout (the benchmark's
    drop rate is 0).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.relu = nn.ReLU()
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


def _bn_value(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """What ``bn(x)`` returns, without touching its running statistics (the block applies ``bn`` itself and
    updates them once): batch statistics in training mode, the running ones in eval mode."""
    if bn.training:
        return torch.nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    return torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False,
                                          eps=bn.eps)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``: a 3x3 stem (16 channels), three stages of ``(depth - 4) / 6`` pre-activation
    blocks with ``16k, 32k, 64k`` channels, then BatchNorm + ReLU, global average pooling and a linear
    classifier.

    Stage outputs are pre-activation (the next block or the final BatchNorm applies the ReLU);
    ``embedding`` is read after the final BatchNorm + ReLU + pooling.

    ``forward(x: (B, 3, H, W)) -> (logits (B, classes), {"stem": (B, 16, H, W), "stage1": (B, 16k, H, W),
    "stage2": (B, 32k, H/2, W/2), "stage3": (B, 64k, H/4, W/4), "embedding": (B, 64k)})``
    """

    feature_names = ("stem", "stage1", "stage2", "stage3", "stage1_preact", "stage2_preact", "stage3_preact",
                     "embedding")

    def __init__(self, depth: int, widen: int, num_classes: int = 100):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"a WRN has depth 6n + 4 >= 10 (10, 16, 22, 28, 40); got {depth}")
        if widen < 1:
            raise ValueError(f"a WRN's widening factor is at least 1; got {widen}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = _conv3x3(3, widths[0])
        stages = []
        for i, (c_in, c_out) in enumerate(zip(widths, widths[1:])):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*(WideBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1)
                                          for j in range(blocks))))
        self.block1, self.block2, self.block3 = stages
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(widths[3], num_classes)
        _init_like_repdistiller(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.conv1(x)
        feats = {"stem": x}
        next_bns = (self.block2[0].bn1, self.block3[0].bn1, self.bn1)
        for i, (stage, bn) in enumerate(zip((self.block1, self.block2, self.block3), next_bns), start=1):
            x = stage(x)
            feats[f"stage{i}"] = x
            feats[f"stage{i}_preact"] = _bn_value(bn, x)
        embedding = self.relu(self.bn1(x)).mean(dim=(2, 3))
        feats["embedding"] = embedding
        return self.fc(embedding), feats


# --- registration: one builder per family, one entry per published network ---------------------------

RESNETS = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
"""RepDistiller's CIFAR ResNets: ``name -> (depth, (stem, stage1, stage2, stage3) channels)``."""

WIDE_RESNETS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}
"""RepDistiller's wide ResNets: ``name -> (depth, widening factor)``."""


def _min_size_check(name: str, image_size: int) -> None:
    # Stages 2 and 3 halve the resolution: below 4 px, stage 3 would be empty.
    if image_size < 4:
        raise ValueError(f"{name} needs images of at least 4 px (got {image_size})")


def _resnet_builder(name: str, depth: int, widths: tuple[int, int, int, int]):
    def build(num_classes: int, image_size: int) -> nn.Module:
        _min_size_check(name, image_size)
        return CifarResNet(depth, widths, num_classes)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f":class:`CifarResNet` of depth {depth}, widths {widths}; any image size (global pooling)."
    return build


def _wrn_builder(name: str, depth: int, widen: int):
    def build(num_classes: int, image_size: int) -> nn.Module:
        _min_size_check(name, image_size)
        return WideResNet(depth, widen, num_classes)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f":class:`WideResNet` WRN-{depth}-{widen}; any image size (global pooling)."
    return build


for _name, (_depth, _widths) in RESNETS.items():
    MODELS.register(_name, _resnet_builder(_name, _depth, _widths))
for _name, (_depth, _widen) in WIDE_RESNETS.items():
    MODELS.register(_name, _wrn_builder(_name, _depth, _widen))
