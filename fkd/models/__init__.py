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
from fkd.models.by_path import builder_from_path, is_module_path
from fkd.models.functional import Model, Params, param_count, size_bytes, split_state
from fkd.models.students import MODELS
from fkd.models.weight_files import fit_state_dict, is_weight_file, read_state_dict
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
    taking ``weights`` (``"imagenet"`` or ``"none"``, see :func:`~fkd.models.zoo.build_torchvision`);
    ``module:Name`` is your own class or builder (:mod:`fkd.models.by_path`). An unknown name is a
    :class:`ConfigError` naming ``key`` and the closest valid names.
    """
    if arch in MODELS:
        return MODELS.get(arch)
    if is_timm_name(arch):
        return timm_builder(arch, key=key)
    if arch in torchvision_names():
        return _torchvision_builder(arch)
    if is_module_path(arch):  # your own nn.Module class or builder, "module:Name"
        return builder_from_path(arch, key=key)
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


def _from_file(module: nn.Module, params: Params, buffers: Params, path: str, *, arch: str, num_classes: int,
               prefix: str, key: str, echo, new_head: str) -> tuple[Params, Params]:
    """``(params, buffers)`` of ``module`` replaced by the state dict in ``path`` (see :func:`build_model`)."""
    try:
        head = head_prefix(module) if new_head is not None else None
    except ConfigError:  # no nn.Linear: no head to resize, every weight must match
        head = None
    table = key.rpartition(".")[0] or "model"
    fix = f"check {table}.arch and its options, or {key}_prefix"
    if new_head is None:
        fix += (f" (a {table} used as it is must predict the data set's {num_classes} classes: to fit a new head, set "
                f"{table}.checkpoint to where the fitted {table} goes and {table}.fit_if_missing = true)")
    fitted = fit_state_dict(read_state_dict(path, prefix=prefix, key=key), params, buffers, head=head,
                            where=f"{key} = '{path}' (for {arch}, {num_classes} classes)", fix=fix,
                            prefix_key=f"{key}_prefix")
    if fitted.head is not None and echo is not None:
        name, size = fitted.head
        echo(f"note: {key} '{path}' has a classifier head '{name}' of {size} outputs, not {num_classes}: a new "
             f"head of {num_classes} replaces it, and {new_head}.")
    return fitted.params, fitted.buffers


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
    weights_prefix: str = "",
    weights_key: str = "weights",
    echo: Callable[[str], None] | None = None,
    new_head: str | None = "it is trained with the rest",
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
            Hugging Face cache; torchvision's default weights for a torchvision name),
            ``"none"`` (random init), or the path of a
            ``.pth`` / ``.pt`` / ``.safetensors`` state dict for ``arch`` (:mod:`fkd.models.weight_files`):
            matched strictly, except that a classifier head of another size stays newly initialised.
        weights_prefix: stripped from the weight file's keys (``module.``, ``model.``).
        weights_key: the config key that named ``weights`` (``teacher.weights``), for messages.
        echo: receives the one note line when the file's classifier head was replaced; ``new_head`` ends
            it (what happens to the new head). ``new_head=None``: the head must fit too (a teacher used as is).
        options: the model's own keys (``widths``, ``batch_norm`` for ``small_cnn``): its builder's
            keyword parameters, see :func:`build_module`.
        seed: initialisation seed; the global RNG is left as it was.
    """
    feature_names = tuple(feature_names)
    if weights == "imagenet" and "weights" not in accepted_keywords(model_builder(arch)):
        raise ConfigError(f"{weights_key} = 'imagenet', but {arch} has no ImageNet weights (torchvision's models "
                          "have); set it to 'none' or to a state dict file.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build_module(arch, num_classes, image_size, weights="none" if is_weight_file(weights) else weights,
                              **options)
    own = getattr(module, "feature_names", None)
    if own is not None:
        unknown = [n for n in feature_names if n not in own]
        if unknown:
            raise ConfigError(f"feature '{unknown[0]}' is not a feature of {arch}; valid names: {', '.join(own)}.")
    params, buffers = split_state(module)
    if is_weight_file(weights):
        params, buffers = _from_file(module, params, buffers, weights, arch=arch, num_classes=num_classes,
                                     prefix=weights_prefix, key=weights_key, echo=echo, new_head=new_head)
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
