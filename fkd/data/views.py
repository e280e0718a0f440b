"""The deterministic view of an example: a square uint8 image at the view size R.

Every data set is first reduced to this view -- the shorter side resized to ``R``, then a
centred ``R x R`` crop, three channels, uint8 -- either once (held in memory) or per example in
DataLoader workers (streamed). Random augmentation happens later, batched, on the device
(:mod:`fkd.data.transforms`), so this step has no randomness and can be cached.

Resizing always runs on tensors (bilinear, antialiased, rounded back to uint8) whatever the
source format, so a PIL image, a NumPy array and a batch of tensors of the same pixels give the
same view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import pil_to_tensor


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """``(h, w)`` after scaling so the shorter side is ``size``, keeping the aspect ratio.

    The longer side is truncated like ``torchvision.transforms.Resize(size)`` does.
    """
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """Top-left corner of the centred ``size x size`` crop of an ``height x width`` image."""
    return (height - size) // 2, (width - size) // 2


def square_view(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` and centre-crop: uint8 (..., C, H, W) -> uint8 (..., 3, size, size).

    ``C`` is 1 (grayscale, repeated to three channels) or 3. The resize is bilinear with
    antialiasing (which matters when shrinking, e.g. STL-10's 96 px to 32 px) computed in
    float32 and rounded to the nearest integer, so it is exactly reproducible per image and
    batched: each image is interpolated independently.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"square_view expects uint8 images, got {images.dtype}")
    *lead, channels, height, width = images.shape
    if channels == 1:
        images = images.expand(*lead, 3, height, width)
    elif channels != 3:
        raise ValueError(f"square_view expects 1 or 3 channels, got {channels}")
    if min(height, width) != size:
        new_h, new_w = resized_shape(height, width, size)
        flat = images.reshape(-1, 3, height, width).float()
        flat = F.interpolate(flat, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        images = flat.round_().clamp_(0, 255).to(torch.uint8).reshape(*lead, 3, new_h, new_w)
        height, width = new_h, new_w
    top, left = center_offsets(height, width, size)
    return images[..., top:top + size, left:left + size].contiguous()


class PilSquareView:
    """``square_view`` for one PIL image (or a uint8 (C, H, W) tensor): a torchvision-style transform.

    A class rather than a closure so DataLoader workers can pickle it.
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            if image.mode not in ("RGB", "L"):
                image = image.convert("RGB")
            image = pil_to_tensor(image)
        return square_view(image, self.size)

    def __repr__(self) -> str:
        return f"PilSquareView(size={self.size})"
