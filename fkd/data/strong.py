"""The strong view: RandAugment on the device, batched, drawn from the step's key (MLKD's second view).

MLKD (Jin et al., CVPR 2023; github.com/Jin-Ying/Multi-Level-Logit-Distillation,
``mdistiller/dataset/cifar100.py``) trains on a weak view (crop + flip) and a strong one: the same plus
``RandAugment(2, 10)`` -- two operations drawn per image from FixMatch's list of 14, each at a uniformly
random magnitude in its range -- and a Cutout of side up to half the image. Its loader builds both views
with PIL on the CPU. Here the strong view is computed *inside the step* from the (already normalised)
weak batch: un-normalise to ``[0, 1]``, apply two drawn operations per image, cut out a box, normalise
again. Every operation is a batched tensor op with per-image parameters, so the view costs no host
work, has static shapes (``torch.compile``, ``vmap``), and its randomness is a pure function of the
step's key (:mod:`fkd.prng`): eager, compiled, vmapped and resumed runs draw the same views.

Differences from the authors' PIL pipeline, on purpose: the strong view shares the weak view's crop and
flip (theirs crops again, independently); geometric operations resample bilinearly on the float image
(PIL: nearest neighbour on 8 bits); equalisation uses a 256-bin histogram of the float image.

Operations (FixMatch's ``fixmatch_augment_pool`` ranges, as the authors' ``augment_list``):
identity, auto-contrast, brightness, colour and contrast and sharpness (factor 0.05..0.95), equalise,
posterise (4..8 bits), rotate (-30..30 degrees), shear x / y (-0.3..0.3), solarise (threshold 0..1),
translate x / y (-0.3..0.3 of the side); then Cutout (side 0..0.5 of the image, filled with the authors'
grey (125, 123, 114)).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fkd import prng
from fkd.data.transforms import CHANNEL_STATS

OPS = ("identity", "autocontrast", "brightness", "color", "contrast", "equalize", "posterize", "rotate",
       "sharpness", "shear_x", "shear_y", "solarize", "translate_x", "translate_y")
#: (low, high) of each operation's magnitude
RANGES = {"brightness": (0.05, 0.95), "color": (0.05, 0.95), "contrast": (0.05, 0.95), "sharpness": (0.05, 0.95),
          "posterize": (4.0, 8.0), "rotate": (-30.0, 30.0), "shear_x": (-0.3, 0.3), "shear_y": (-0.3, 0.3),
          "solarize": (0.0, 1.0), "translate_x": (-0.3, 0.3), "translate_y": (-0.3, 0.3)}
CUTOUT_FILL = (125 / 255, 123 / 255, 114 / 255)
NUM_OPS = 2  # RandAugment(n=2, ...)
MAX_CUTOUT = 0.5


def _per_image(v: Tensor) -> Tensor:
    return v[:, None, None, None]


def _gray(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma (PIL's ``convert("L")``), (B, 1, H, W)."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL's ``ImageEnhance``: ``degenerate + factor (x - degenerate)``, clipped to [0, 1]."""
    return (degenerate + _per_image(factor) * (x - degenerate)).clamp(0.0, 1.0)


def _autocontrast(x: Tensor) -> Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp(min=1e-12), x)


def _equalize(x: Tensor) -> Tensor:
    """Histogram equalisation per image and channel over 256 levels (the CDF as a lookup table)."""
    b, c, h, w = x.shape
    levels = (x * 255).round().clamp(0, 255).to(torch.int64).reshape(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=x.dtype, device=x.device).scatter_add(1, levels, torch.ones_like(
        levels, dtype=x.dtype))
    cdf = hist.cumsum(dim=1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float(h * w))).amin(dim=1, keepdim=True)
    lut = ((cdf - cdf_min) / (h * w - cdf_min).clamp(min=1)).clamp(0, 1)
    return lut.gather(1, levels).reshape(b, c, h, w)


def _posterize(x: Tensor, bits: Tensor) -> Tensor:
    step = _per_image(2.0 ** (8 - bits.floor()))
    return torch.floor(torch.floor(x * 255) / step) * step / 255


def _sharpness(x: Tensor, factor: Tensor) -> Tensor:
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device) / 13
    smooth = F.conv2d(x.reshape(-1, 1, *x.shape[-2:]), kernel[None, None], padding=1).reshape(x.shape)
    h, w = x.shape[-2:]
    border = torch.ones(h, w, dtype=torch.bool, device=x.device)  # PIL keeps the border pixels
    border[1:-1, 1:-1] = False
    return _blend(torch.where(border, x, smooth), x, factor)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """Resample ``x`` at ``theta @ (u, v, 1)`` (normalised coordinates), zeros outside (PIL's black fill)."""
    h, w = x.shape[-2:]  # pixel centres in [-1, 1] (affine_grid's align_corners=False), built without it: vmappable
    ys = (torch.arange(h, dtype=x.dtype, device=x.device) * 2 + 1) / h - 1
    xs = (torch.arange(w, dtype=x.dtype, device=x.device) * 2 + 1) / w - 1
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, dtype=x.dtype, device=x.device)],
                       dim=-1)  # (H, W, 3)
    grid = torch.einsum("hwk,bjk->bhwj", base, theta)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _geometric(x: Tensor, op: str, m: Tensor) -> Tensor:
    b = x.shape[0]
    one, zero = torch.ones(b, dtype=x.dtype, device=x.device), torch.zeros(b, dtype=x.dtype, device=x.device)
    if op == "rotate":
        a = m * math.pi / 180
        rows = [torch.cos(a), -torch.sin(a), zero, torch.sin(a), torch.cos(a), zero]
    elif op == "shear_x":
        rows = [one, m, zero, zero, one, zero]
    elif op == "shear_y":
        rows = [one, zero, zero, m, one, zero]
    elif op == "translate_x":  # a fraction of the side; normalised coordinates span 2
        rows = [one, zero, 2 * m, zero, one, zero]
    else:  # translate_y
        rows = [one, zero, zero, zero, one, 2 * m]
    return _affine(x, torch.stack(rows, dim=1).reshape(b, 2, 3))


def apply_op(x: Tensor, op: str, magnitude: Tensor) -> Tensor:
    """Operation ``op`` on ``[0, 1]`` images ``(B, 3, H, W)`` with per-image ``magnitude`` (B,) in its range."""
    if op == "identity":
        return x
    if op == "autocontrast":
        return _autocontrast(x)
    if op == "brightness":
        return _blend(torch.zeros_like(x), x, magnitude)
    if op == "color":
        return _blend(_gray(x).expand_as(x), x, magnitude)
    if op == "contrast":
        return _blend(_gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), x, magnitude)
    if op == "equalize":
        return _equalize(x)
    if op == "posterize":
        return _posterize(x, magnitude)
    if op == "sharpness":
        return _sharpness(x, magnitude)
    if op == "solarize":
        return torch.where(x >= _per_image(magnitude), 1.0 - x, x)
    return _geometric(x, op, magnitude)


def _cutout(x: Tensor, key: Tensor) -> Tensor:
    b, _, h, w = x.shape
    draws = prng.uniform(key, (3, b)).to(x.device, x.dtype)
    side = draws[0] * MAX_CUTOUT * h
    cy, cx = draws[1] * h, draws[2] * w
    rows = torch.arange(h, dtype=x.dtype, device=x.device) + 0.5
    cols = torch.arange(w, dtype=x.dtype, device=x.device) + 0.5
    inside = (((rows[None] - cy[:, None]).abs() < side[:, None] / 2)[:, :, None]
              & ((cols[None] - cx[:, None]).abs() < side[:, None] / 2)[:, None, :])[:, None]
    fill = torch.tensor(CUTOUT_FILL, dtype=x.dtype, device=x.device)[None, :, None, None]
    return torch.where(inside, fill, x)


def rand_augment(x: Tensor, key: Tensor) -> Tensor:
    """RandAugment(2) + Cutout on ``[0, 1]`` images ``(B, 3, H, W)``: per image two operations (uniform over
    :data:`OPS`, with replacement) at uniform magnitudes in :data:`RANGES`, then one Cutout box."""
    b = x.shape[0]
    for slot in range(NUM_OPS):
        chosen = prng.randint(prng.fold_in(key, 2 * slot), (b,), len(OPS)).to(x.device)
        u = prng.uniform(prng.fold_in(key, 2 * slot + 1), (b,)).to(x.device, x.dtype)
        out = x
        for i, op in enumerate(OPS):
            lo, hi = RANGES.get(op, (0.0, 1.0))
            candidate = apply_op(x, op, lo + (hi - lo) * u)
            out = torch.where(_per_image(chosen == i), candidate, out)
        x = out
    return _cutout(x, prng.fold_in(key, 2 * NUM_OPS))


def make_strong_view(normalize: str) -> Callable[[Tensor, Tensor], Tensor]:
    """``strong(x, key) -> x``: the strong view of a normalised batch (``data.normalize = normalize``).

    ``x`` is float (B, 3, H, W) normalised as the data set's ``normalize`` names (:data:`CHANNEL_STATS`, or
    ``"none"``: ``x / 255``); the result is normalised the same way.
    """
    if normalize != "none" and normalize not in CHANNEL_STATS:
        raise ValueError(f"unknown normalisation {normalize!r}")

    def strong(x: Tensor, key: Tensor) -> Tensor:
        if normalize == "none":
            return rand_augment(x.clamp(0, 1), key)
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device)[:, None, None] for v in CHANNEL_STATS[normalize])
        return (rand_augment((x * std + mean).clamp(0, 1), key) - mean) / std

    return strong


def strong_view_for(data_cfg, objective) -> Callable[[Tensor, Tensor], Tensor] | None:
    """The step's ``strong_view`` for a run: :func:`make_strong_view` of its ``data.normalize`` when a term
    consumes the strong view (:attr:`fkd.objective.Objective.needs_strong_view`), else None."""
    return make_strong_view(data_cfg.normalize) if objective.needs_strong_view else None
