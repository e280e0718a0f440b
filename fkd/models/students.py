"""Student networks written for fkd. Their ``forward`` returns ``(logits, features)``.

Features are returned explicitly, as a dict of named intermediate tensors, instead of being
captured with module hooks (big_vision style).

Each network is registered in :data:`MODELS` under the name a config gives (``student.arch``,
``teacher.arch``) by a builder ``builder(num_classes, image_size, **options) -> nn.Module``, whose
keyword parameters say which of the config's model options (``widths``, ``batch_norm``) it takes.
"""

from __future__ import annotations

import torch
from torch import nn

from fkd.registry import Registry

MODELS = Registry("model", "arch", load=("fkd.models.cifar",))
"""fkd's own architectures by name (these and the CIFAR benchmark networks of :mod:`fkd.models.cifar`,
imported on first lookup). Torchvision classifiers are found by name too, without being listed here (see
:func:`fkd.models.model_builder`)."""


def _conv(c_in: int, c_out: int, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU())
    return layers


class SeedCNN(nn.Module):
    """The notebook's ``DeeperStudentCNN``: four conv blocks, then fc 256 -> classes.

    Blocks (3x3 convs, no bias, ReLU; each block ends in 2x2 max-pooling)::

        block1: 3 -> 32 -> 32      (H/2)
        block2: 32 -> 64 -> 64     (H/4)
        block3: 64 -> 128 -> 128   (H/8)
        block4: 128 -> 256         (H/16)

    The notebook hard-codes ``fc1 = Linear(256 * 14 * 14, 256)``, which only fits 224 px input; here
    the classifier input is derived from ``image_size`` (``256 * (image_size // 16) ** 2``), so the
    same network works at 32 px and at 224 px.

    ``forward(x: (B, 3, H, W)) -> (logits (B, classes), {"block1": (B, 32, H/2, W/2), ..., "block4": (B, 256, H/16, W/16),
    "embedding": (B, 256), "block1_preact": ..., "block4_preact": ...})``; ``embedding`` is what ``fc2`` reads,
    ``relu(fc1(flatten(block4)))``; ``blockN_preact`` is block N's output before its last ReLU,
    ``maxpool(conv(...))``, so that ``blockN == relu(blockN_preact)`` exactly (max-pooling and ReLU commute):
    the pre-activation feature OFD and AB distil.
    """

    feature_names = ("block1", "block2", "block3", "block4", "embedding",
                     "block1_preact", "block2_preact", "block3_preact", "block4_preact")

    def __init__(self, num_classes: int = 10, image_size: int = 224):
        super().__init__()
        if image_size < 16:
            raise ValueError(f"seed_cnn needs images of at least 16 px (got {image_size})")
        self.block1 = nn.Sequential(*_conv(3, 32, False), *_conv(32, 32, False), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(*_conv(32, 64, False), *_conv(64, 64, False), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(*_conv(64, 128, False), *_conv(128, 128, False), nn.MaxPool2d(2))
        self.block4 = nn.Sequential(*_conv(128, 256, False), nn.MaxPool2d(2))
        side = image_size // 16
        self.fc1 = nn.Linear(256 * side * side, 256)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feats = {}
        for i, block in enumerate((self.block1, self.block2, self.block3, self.block4), start=1):
            # [..., conv, ReLU, MaxPool]: pool before the last ReLU, which equals pooling after it
            preact = block[-1](block[:-2](x))
            x = block[-2](preact)
            feats[f"block{i}"], feats[f"block{i}_preact"] = x, preact
        embedding = self.relu(self.fc1(torch.flatten(x, 1)))
        feats["embedding"] = embedding
        return self.fc2(embedding), feats


class SmallCNN(nn.Module):
    """A narrow configurable CNN for fast CPU runs.

    One block per entry of ``widths``: 3x3 conv (+ BatchNorm) + ReLU, then 2x2 max-pooling; then global
    average pooling and a linear classifier. Features are ``block1``..``blockN`` (after pooling) and
    ``pool`` (the pooled vector, (B, widths[-1])), also named ``embedding`` (what the classifier reads).
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32), batch_norm: bool = True):
        super().__init__()
        widths = tuple(widths)
        chans = (3, *widths)
        self.blocks = nn.ModuleList(
            nn.Sequential(*_conv(c_in, c_out, batch_norm), nn.MaxPool2d(2)) for c_in, c_out in zip(chans, chans[1:])
        )
        self.fc = nn.Linear(widths[-1], num_classes)
        self.feature_names = (*(f"block{i + 1}" for i in range(len(widths))), "pool", "embedding")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feats = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            feats[f"block{i + 1}"] = x
        pooled = x.mean(dim=(2, 3))
        feats["pool"] = feats["embedding"] = pooled
        return self.fc(pooled), feats


@MODELS.register("seed_cnn")
def seed_cnn(num_classes: int, image_size: int) -> nn.Module:
    """:class:`SeedCNN`; its classifier input follows ``image_size``. Takes no options."""
    return SeedCNN(num_classes, image_size)


@MODELS.register("small_cnn")
def small_cnn(num_classes: int, image_size: int, *, widths=(16, 32), batch_norm: bool = True) -> nn.Module:
    """:class:`SmallCNN` with one block per entry of ``widths``; global pooling makes it size-agnostic.

    Args:
        widths: small_cnn: channels per conv block
        batch_norm: small_cnn: BatchNorm after each conv
    """
    return SmallCNN(num_classes, tuple(widths), batch_norm)
