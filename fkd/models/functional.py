"""Models as stateless parameter pytrees.

A :class:`Model` is only a *template*: the module structure, on the ``meta`` device so it owns no
weights. The weights live in two flat dicts that the caller holds and threads through calls:

* ``params``  -- ``{dotted name: Tensor}``, the trainable weights, detached;
* ``buffers`` -- ``{dotted name: Tensor}``, BatchNorm running statistics and counters.

``model.apply(params, buffers, x, train=...)`` runs the template with
:func:`torch.func.functional_call` and returns ``(logits, features, new_buffers)``. In training mode
BatchNorm updates its running statistics; those updates land in fresh copies that are returned as
``new_buffers``, so the caller's dicts are never mutated (see pytorch/pytorch#85533 for why in-place
buffer updates and torch.func transforms do not mix).
"""

from __future__ import annotations

import copy
import weakref
from typing import Any, Callable

import attrs
import torch
import torch.fx
from torch import nn
from torch.func import functional_call

from fkd.models.zoo import LOGITS

Params = dict[str, torch.Tensor]


@attrs.frozen(eq=False)
class Model:
    """A module template applied functionally.

    Attributes:
        arch: architecture name (``seed_cnn``, ``small_cnn``, ``resnet18``, ...).
        num_classes: width of the logits.
        feature_names: the features ``apply`` returns, in order.
        train_template / eval_template: the same network in train and eval mode (FX feature extractors
            are traced per mode, so the mode is fixed once per template instead of toggled per call).
        returns_dict: True for FX extractors (output ``{LOGITS: ..., name: ...}``), False for modules whose
            forward returns ``(logits, features)`` or bare logits.
    """

    arch: str
    num_classes: int
    feature_names: tuple[str, ...]
    train_template: nn.Module
    eval_template: nn.Module
    returns_dict: bool
    image_size: int
    spec: dict = attrs.field(factory=dict)  # what build_model needs to rebuild this model (for checkpoints)
    # Names an FX template pruned (e.g. an auxiliary head its graph never reaches), per mode; such
    # entries of params/buffers are left out of that template's call. Empty for almost every model.
    pruned: dict = attrs.field(factory=dict)

    def apply(
        self, params: Params, buffers: Params, x: torch.Tensor, *, train: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Params]:
        """Forward ``x`` (B, 3, H, W) -> ``(logits (B, num_classes), {name: feature}, new_buffers)``.

        ``train=True`` uses batch statistics and returns updated running statistics in ``new_buffers``;
        ``train=False`` uses the running statistics and returns ``buffers`` itself.
        """
        template = self.train_template if train else self.eval_template
        # BatchNorm writes its running stats in place: give it copies, return them.
        new_buffers = {k: v.clone() for k, v in buffers.items()} if train else buffers
        call_params, call_buffers = params, new_buffers
        pruned = self.pruned.get(train, ())
        if pruned:  # same tensors, minus the ones this graph does not have
            call_params = {k: v for k, v in params.items() if k not in pruned}
            call_buffers = {k: v for k, v in new_buffers.items() if k not in pruned}
        out = functional_call(template, (call_params, call_buffers), (x,), strict=False)
        logits, features = self._split(out)
        return logits, features, new_buffers

    def features_fn(self) -> Callable[[Params, Params, torch.Tensor], dict[str, torch.Tensor]]:
        """``fn(params, buffers, x) -> {name: feature}``: the eval-mode features without the logits.

        For an FX extractor (a torchvision model) the graph is cut after the last requested feature by
        dead-code elimination, so the layers behind it never run: a teacher whose logits the objective
        does not use (feature or attention distillation) stops there -- ResNet-18 asked for ``layer1``
        runs its stem and ``layer1`` only, about 40% of its forward. The features are the same tensors
        :meth:`apply` returns. fkd's own CNNs run their whole forward and drop the logits.

        Build it once, outside a compiled function (it traces nothing itself, but copies the graph).
        """
        if not (self.returns_dict and self.feature_names and isinstance(self.eval_template, torch.fx.GraphModule)):
            return lambda params, buffers, x: self.apply(params, buffers, x, train=False)[1]
        template, names = _cut_after_features(self.eval_template, self.feature_names)
        feature_names = self.feature_names

        def features(params: Params, buffers: Params, x: torch.Tensor) -> dict[str, torch.Tensor]:
            used_params = {k: v for k, v in params.items() if k in names}
            used_buffers = {k: v for k, v in buffers.items() if k in names}
            out = functional_call(template, (used_params, used_buffers), (x,), strict=False)
            return {n: out[n] for n in feature_names}

        return features

    def _split(self, out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.returns_dict:
            return out[LOGITS], {n: out[n] for n in self.feature_names}
        if isinstance(out, tuple):
            logits, features = out
            return logits, {n: features[n] for n in self.feature_names}
        return out, {}


# One cut template per (extractor, features): a step rebuilt around the same model then finds its
# compiled graph in torch.compile's cache (each GraphModule has a class of its own, which it guards on).
_CUT_TEMPLATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cut_after_features(
    extractor: torch.fx.GraphModule, feature_names: tuple[str, ...]
) -> tuple[torch.fx.GraphModule, frozenset]:
    """A copy of an FX feature extractor that returns only ``feature_names`` (its dead code removed),
    and the names of the weights it still uses."""
    key = tuple(dict.fromkeys(feature_names))
    cached = _CUT_TEMPLATES.setdefault(extractor, {})
    if key not in cached:
        graph = copy.deepcopy(extractor.graph)
        output = next(node for node in graph.nodes if node.op == "output")
        returned = output.args[0]
        output.args = ({n: returned[n] for n in key},)
        cut = torch.fx.GraphModule(extractor, graph)
        cut.graph.eliminate_dead_code()
        cut.recompile()
        cut.delete_all_unused_submodules()  # so only the weights it calls are passed in
        cut.train(extractor.training)
        names = frozenset(k for k, _ in cut.named_parameters()) | frozenset(k for k, _ in cut.named_buffers())
        cached[key] = (cut, names)
    return cached[key]


def split_state(module: nn.Module) -> tuple[Params, Params]:
    """Detached copies of a module's parameters and buffers as two flat dicts."""
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in module.named_buffers()}
    return params, buffers


def param_count(params: Params) -> int:
    """Number of scalar parameters in a pytree."""
    return sum(p.numel() for p in params.values())


def size_bytes(params: Params, buffers: Params | None = None) -> int:
    """Bytes the weights occupy (``numel * element_size`` over params and buffers)."""
    tensors = list(params.values()) + list((buffers or {}).values())
    return sum(t.numel() * t.element_size() for t in tensors)


def feature_shapes(model: Model, params: Params, buffers: Params, image_size: int, device) -> dict:
    """``{feature name: shape without batch}`` from one eval-mode forward pass of a zero image."""
    x = torch.zeros(1, 3, image_size, image_size, device=device)
    with torch.no_grad():
        _, feats, _ = model.apply(params, buffers, x, train=False)
    return {k: tuple(v.shape[1:]) for k, v in feats.items()}
