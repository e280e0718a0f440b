"""Model construction: students, torchvision teachers, and the functional :class:`Model` wrapper.

``build_model(arch, num_classes, image_size, feature_names)`` returns ``(model, params, buffers)``:
a weightless template plus the weights as flat dicts (see :mod:`fkd.models.functional`).

``arch`` is looked up in :data:`MODELS` (fkd's own networks, :mod:`fkd.models.students`) first, then
among torchvision's classifiers (:func:`torchvision_names`), and ``timm:<name>`` is a timm model
(:mod:`fkd.models.timm_models`, the optional ``timm`` extra); :func:`model_builder` is that lookup. A new
architecture is a module whose ``forward`` returns ``(logits, features)`` plus a builder registered with
``@MODELS.register("name")``.
"""

from __future__ import annotations

import copy
import difflib
from typing import Callable

import torch
from torch import nn

from fkd.errors import ConfigError
from fkd.models.functional import Model, Params, param_count, size_bytes, split_state
from fkd.models.students import MODELS
from fkd.models.timm_models import is_timm_name, timm_builder, tracer_kwargs, train_logits_node
from fkd.models.zoo import build_torchvision, feature_node_names, head_prefix, torchvision_names, with_features
from fkd.registry import accepted_keywords

__all__ = [
    "Model", "Params", "build_model", "build_module", "model_builder", "param_count", "size_bytes",
    "split_state", "available_features", "head_prefix", "MODELS", "torchvision_names",
]


def model_builder(arch: str, *, key: str = "arch") -> Callable[..., nn.Module]:
    """``builder(num_classes, image_size, **options) -> nn.Module`` for ``arch``.

    A name registered in :data:`MODELS` comes first; any other torchvision classifier name gets a builder
    taking ``weights`` (``"imagenet"`` or ``"none"``, see :func:`~fkd.models.zoo.build_torchvision`). An
    unknown name is a :class:`ConfigError` naming ``key`` and the closest valid names.
    """
    if arch in MODELS:
        return MODELS.get(arch)
    if is_timm_name(arch):
        return timm_builder(arch, key=key)
    if arch in torchvision_names():
        return _torchvision_builder(arch)
    close = difflib.get_close_matches(arch, [*MODELS.names(), *torchvision_names()], n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else (
        f"use {', '.join(MODELS.names())} or a torchvision classifier (resnet18, mobilenet_v3_small, "
        "efficientnet_b0, ...).")
    raise ConfigError(f"{key} = '{arch}' is not a known model; {hint}")


def _torchvision_builder(arch: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, image_size: int, *, weights: str = "none") -> nn.Module:
        return build_torchvision(arch, num_classes, weights)

    return build


def build_module(arch: str, num_classes: int, image_size: int, *, key: str = "arch",
                 **options) -> nn.Module:
    """A freshly initialised ``nn.Module`` of ``arch`` (weights from the global RNG).

    ``options`` are the model options of a config (``widths``, ``batch_norm``, ``weights``); each
    builder gets exactly those its signature accepts (``small_cnn`` takes widths and batch_norm,
    ``seed_cnn`` none, a torchvision classifier ``weights``): the build layer (:mod:`fkd.build`) has
    already refused a key the chosen model does not take, and a checkpoint's older spec may carry some.
    """
    builder = model_builder(arch, key=key)
    accepted = accepted_keywords(builder)
    return builder(num_classes, image_size, **{k: v for k, v in options.items() if k in accepted})


def available_features(module: nn.Module) -> list[str]:
    """Feature names a module can return: its own ``feature_names`` or its FX node names."""
    own = getattr(module, "feature_names", None)
    return list(own) if own is not None else feature_node_names(module, tracer_kwargs(module))


def _state_names(module: nn.Module) -> set[str]:
    return {k for k, _ in module.named_parameters()} | {k for k, _ in module.named_buffers()}


def build_model(
    arch: str,
    num_classes: int,
    image_size: int,
    feature_names: tuple[str, ...] | list[str] = (),
    *,
    weights: str = "none",
    seed: int = 0,
    device: torch.device | str = "cpu",
    **options,
) -> tuple[Model, Params, Params]:
    """Build ``arch`` and return ``(model, params, buffers)``.

    Args:
        arch: a name registered in :data:`MODELS` (``seed_cnn``, ``small_cnn``), a torchvision
            classifier name or ``timm:<name>`` (see :func:`model_builder`).
        num_classes: output classes; a torchvision head is resized to it.
        image_size: input side in pixels (``seed_cnn`` derives its classifier input from it).
        feature_names: intermediate tensors ``apply`` returns -- block names for fkd's own CNNs, FX node
            names (``layer1``, ``layer2.1.relu``) for torchvision models. Unknown names raise a
            :class:`ConfigError` listing the valid ones.
        weights: ``"imagenet"`` (torchvision's default weights), ``"pretrained"`` (timm's, from the local
            Hugging Face cache; torchvision's default weights for a torchvision name) or ``"none"``.
        options: the model's own keys (``widths``, ``batch_norm`` for ``small_cnn``): its builder's
            keyword parameters, see :func:`build_module`.
        seed: initialisation seed; the global RNG is left as it was.
    """
    feature_names = tuple(feature_names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_module(arch, num_classes, image_size, weights=weights, **options)
    own = getattr(module, "feature_names", None)
    if own is not None:
        unknown = [n for n in feature_names if n not in own]
        if unknown:
            raise ConfigError(f"feature '{unknown[0]}' is not a feature of {arch}; valid names: {', '.join(own)}.")
    params, buffers = split_state(module)
    params = {k: v.to(device) for k, v in params.items()}
    buffers = {k: v.to(device) for k, v in buffers.items()}
    # The templates keep no weights (every call gets them from the caller's dicts), so they are
    # built on the meta device: copying and tracing them costs no memory.
    module.to("meta")
    if own is None:  # torchvision, timm: an FX graph per mode returning {logits, features} as one dict
        tracer, logits_node = tracer_kwargs(module), train_logits_node(module)
        train_t = with_features(copy.deepcopy(module), feature_names, train=True, tracer_kwargs=tracer,
                                logits_node=logits_node)
        eval_t = with_features(module, feature_names, train=False, tracer_kwargs=tracer)
        returns_dict = True
    else:
        train_t, eval_t, returns_dict = module.train(), copy.deepcopy(module).eval(), False
    spec = {"arch": arch, "num_classes": num_classes, "image_size": image_size,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}}
    names = set(params) | set(buffers)
    pruned = {mode: frozenset(names - _state_names(t)) for mode, t in ((True, train_t), (False, eval_t))}
    model = Model(arch=arch, num_classes=num_classes, feature_names=feature_names, train_template=train_t,
                  eval_template=eval_t, returns_dict=returns_dict, image_size=image_size, spec=spec,
                  pruned={mode: p for mode, p in pruned.items() if p})
    return model, params, buffers
