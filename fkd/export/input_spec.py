"""What an exported file takes as input, and the normalisation built into it.

The normalisation is **built in**: an exported classifier takes images as fkd's test split views them
before normalising -- float32 (B, 3, S, S), RGB, NCHW, values ``pixels / 255`` in [0, 1] -- and computes
``(x - mean) / std`` itself with the statistics of the run's ``data.normalize``
(:data:`fkd.data.transforms.CHANNEL_STATS`; mean 0 and std 1 for ``"none"``). A serving stack therefore
needs no statistics of its own, only the same view: the shorter side resized to R (``data.resize``, or
S when 0) and the centred S x S crop (:mod:`fkd.data.views`).
"""

from __future__ import annotations

import attrs
import torch

from fkd.config import DataConfig
from fkd.data.transforms import CHANNEL_STATS

INPUT_NAME = "x"
OUTPUT_NAME = "logits"


@attrs.frozen
class InputSpec:
    """The input of an exported classifier: ``x`` float32 (batch, 3, image_size, image_size) in [0, 1]."""

    image_size: int
    view_size: int
    normalize: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def for_data(cls, data: DataConfig) -> "InputSpec":
        """The input a model trained on ``data`` takes once exported."""
        mean, std = CHANNEL_STATS.get(data.normalize, ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
        return cls(image_size=data.image_size, view_size=data.resize or data.image_size,
                   normalize=data.normalize, mean=tuple(mean), std=tuple(std))

    def example(self, batch: int, seed: int = 0) -> torch.Tensor:
        """A float32 (batch, 3, S, S) input of uniform values in [0, 1] (for tracing and timing)."""
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(batch, 3, self.image_size, self.image_size, generator=generator)

    def as_dict(self) -> dict:
        """The spec as export.json states it."""
        s = self.image_size
        return {
            "name": INPUT_NAME,
            "shape": ["batch", 3, s, s],
            "dtype": "float32",
            "layout": "NCHW",
            "channel_order": "RGB",
            "value_range": [0.0, 1.0],
            "scaling": "pixels / 255",
            "normalization": (f"built in: the file computes (x - mean) / std itself ({self.normalize})"
                              if self.normalize != "none" else "none: the model was trained on pixels / 255 as is"),
            "mean": list(self.mean),
            "std": list(self.std),
            "view": f"shorter side resized to {self.view_size} px, then the centred {s} x {s} crop",
            "output": {"name": OUTPUT_NAME, "shape": ["batch", "num_classes"], "dtype": "float32",
                       "meaning": "unnormalised class scores (argmax is the prediction; softmax gives probabilities)"},
        }
