"""The exportable classifier: fkd's ``Model.apply`` in eval mode as an ``nn.Module`` returning logits.

Exporters trace an ``nn.Module`` whose weights are its own, while fkd keeps weights outside the model
(:mod:`fkd.models.functional`). :class:`ExportableClassifier` holds a copy of the saved weights as its
parameters and buffers and calls ``model.apply`` with them, so the traced graph *is* fkd's forward, not
a re-implementation of it; the input normalisation is built in (:mod:`fkd.export.input_spec`).
"""

from __future__ import annotations

import torch
from torch import nn

from fkd.export.input_spec import InputSpec
from fkd.models import Model, Params


class ExportableClassifier(nn.Module):
    """``forward(x) -> logits``: ``model.apply(params, buffers, (x - mean) / std, train=False)[0]``.

    ``x``: float32 (B, 3, S, S) in [0, 1]; logits: float32 (B, num_classes). The weights are copied, so
    the caller's dicts are never touched. Parameters are registered as (frozen) ``nn.Parameter`` and
    buffers as buffers, so exporters and quantizers see weights as weights (BatchNorm folding needs it).
    Dots in weight names become ``__`` (module attribute names cannot hold dots).
    """

    def __init__(self, model: Model, params: Params, buffers: Params, spec: InputSpec):
        super().__init__()
        self.model = model  # a plain attribute: the template owns no weights and must not be registered
        self._param_names = {name: _attr(name) for name in params}
        self._buffer_names = {name: _attr(name) for name in buffers}
        for name, value in params.items():
            self.register_parameter(_attr(name), nn.Parameter(value.detach().clone().cpu(), requires_grad=False))
        for name, value in buffers.items():
            self.register_buffer(_attr(name), value.detach().clone().cpu())
        self.register_buffer("input_mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("input_std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = {name: getattr(self, attr) for name, attr in self._param_names.items()}
        buffers = {name: getattr(self, attr) for name, attr in self._buffer_names.items()}
        logits, _, _ = self.model.apply(params, buffers, (x - self.input_mean) / self.input_std, train=False)
        return logits


def _attr(name: str) -> str:
    return name.replace(".", "__")
