"""The per-batch transform, run on the device: crop, flip, scale to [0, 1], normalise.

Views arrive as uint8 (B, 3, R, R) already on the device; the output is the float32
(B, 3, S, S) batch a model sees (``S = image_size``). Everything is batched tensor indexing, so
it costs a few kernels per batch instead of per-image Python in DataLoader workers.

Random choices (crop offsets, flips) are drawn on the device itself from a counter-based key
(:mod:`fkd.prng`) made from the batch's seed (:func:`fkd.data.order.augmentation_seed`) with
scalar arithmetic only: no CPU generator, no host-to-device copy, no synchronisation per batch.
The draws are integer hashing, so the same seed gives the same augmentation on any device, and a
resumed run sees exactly the crops it would have seen.
"""

from __future__ import annotations

import functools

import attrs
import torch
import torch.nn.functional as F

from fkd import prng
from fkd.config import DataConfig
from fkd.data.views import center_offsets

# ImageNet channel statistics (torchvision's pretrained weights expect them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CHANNEL_STATS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    # CIFAR-100's training-set statistics, as the distillation benchmark normalises (RepDistiller's and
    # mdistiller's dataset/cifar100.py).
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
"""``data.normalize`` name -> per-channel (mean, std) of ``x / 255``; ``"none"`` is the plain ``x / 255``."""


@attrs.frozen
class BatchTransform:
    """How uint8 views (B, 3, R, R) become model inputs (B, 3, size, size).

    ``crop == "random"``: zero-pad by ``pad`` and take a random ``size x size`` crop per image;
    ``"center"``: the centred crop. ``flip``: mirror each image left-right with probability 1/2.
    Both apply only when the batch is augmented; otherwise the centred crop is taken.
    ``normalize`` names the statistics (:data:`CHANNEL_STATS`) that map ``x / 255`` to
    ``(x / 255 - mean) / std`` per channel; ``"none"`` keeps ``x / 255``.
    """

    size: int
    crop: str = "center"
    pad: int = 0
    flip: bool = False
    normalize: str = "imagenet"

    @classmethod
    def for_split(cls, cfg: DataConfig, *, train: bool) -> "BatchTransform":
        """The training transform (random parts from ``cfg``) or the evaluation one (none)."""
        if train:
            return cls(cfg.image_size, cfg.crop, cfg.pad, cfg.flip, cfg.normalize)
        return cls(cfg.image_size, normalize=cfg.normalize)

    @property
    def is_random(self) -> bool:
        """True when augmenting changes the output (so its outputs cannot be cached).

        The one definition: :func:`augments` asks the training transform.
        """
        return self.crop == "random" or self.flip

    def __call__(self, views: torch.Tensor, *, seed: int | None = None) -> torch.Tensor:
        """uint8 (B, 3, R, R) -> float32 (B, 3, size, size) on ``views.device``.

        ``seed=None`` is the deterministic view (centred crop); an integer seed augments.
        """
        if seed is None or not self.is_random:
            x = center_crop(views, self.size)
        else:
            top, left, flip = self.draw(views.shape[0], views.shape[-1], seed, views.device)
            x = crop_and_flip(views, top, left, flip, self.size, self.pad if self.crop == "random" else 0)
        return normalize(x, self.normalize)

    def draw(self, batch: int, view_size: int, seed: int, device: torch.device | str = "cpu"):
        """The random crop corners and flips for one batch: three (B,) int64 / bool tensors on ``device``.

        ``top`` and ``left`` index the zero-padded view (side ``R + 2 * pad``); without a random
        crop they are the centred corner in those coordinates. They are drawn on ``device`` from
        ``prng.key_from_int(seed)``: corners ``randint(fold_in(key, 0), (2, B), slack + 1)`` with
        ``slack = R + 2 * pad - size``, flips ``uniform(fold_in(key, 1), (B,)) < 1/2``.
        """
        key = prng.key_from_int(seed, device)
        if self.crop == "random":
            slack = view_size + 2 * self.pad - self.size
            corners = prng.randint(prng.fold_in(key, _CORNERS), (2, batch), slack + 1)
        else:
            corners = torch.full((2, batch), (view_size - self.size) // 2, dtype=torch.int64, device=device)
        if self.flip:
            flips = prng.uniform(prng.fold_in(key, _FLIPS), (batch,)) < 0.5
        else:
            flips = torch.zeros(batch, dtype=torch.bool, device=device)
        return corners[0], corners[1], flips


_CORNERS, _FLIPS = 0, 1  # the two streams of a batch's key


def center_crop(views: torch.Tensor, size: int) -> torch.Tensor:
    """The centred ``size x size`` crop: (B, C, R, R) -> (B, C, size, size) (a view when R == size)."""
    height, width = views.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from {height}x{width} views")
    top, left = center_offsets(height, width, size)
    return views[..., top:top + size, left:left + size]


def crop_and_flip(views: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
                  size: int, pad: int = 0) -> torch.Tensor:
    """Per-image crops of the zero-padded views, optionally mirrored.

    ``views``: (B, C, R, R); ``top``, ``left``: (B,) int64 corners in the padded image of side
    ``R + 2 * pad``; ``flip``: (B,) bool. Returns (B, C, size, size), same dtype. Implemented as
    two ``gather`` calls with broadcast (stride-0) indices, so no per-pixel index tensor is built.
    """
    if pad:
        views = F.pad(views, (pad, pad, pad, pad))
    batch, channels, height, width = views.shape
    steps = torch.arange(size, device=views.device)
    rows = top[:, None] + steps  # (B, size)
    cols = left[:, None] + steps
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a mirrored crop reads its columns backwards
    x = views.gather(2, rows[:, None, :, None].expand(batch, channels, size, width))
    return x.gather(3, cols[:, None, None, :].expand(batch, channels, size, size))


@functools.lru_cache(maxsize=8)
def _channel_stats(kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per device: creating them per batch would be a host-to-device copy each time.
    mean, std = CHANNEL_STATS[kind]
    return torch.tensor(mean, device=device).view(3, 1, 1), torch.tensor(std, device=device).view(3, 1, 1)


def normalize(x: torch.Tensor, kind: str = "imagenet") -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32: ``x / 255``, then ``(x / 255 - mean) / std`` with the statistics
    :data:`CHANNEL_STATS` names (``"imagenet"``, ``"cifar100"``); ``"none"`` stops at ``x / 255``."""
    out = x.float() / 255.0  # always a new tensor, so the in-place steps below touch only ours
    if kind in CHANNEL_STATS:
        mean, std = _channel_stats(kind, out.device)
        out.sub_(mean).div_(std)
    elif kind != "none":
        raise ValueError(f"unknown normalisation {kind!r}")
    return out


def augments(cfg: DataConfig) -> bool:
    """True when the training view is random (so teacher outputs cannot be cached): whether the training
    :class:`BatchTransform` ``is_random``."""
    return BatchTransform.for_split(cfg, train=True).is_random
