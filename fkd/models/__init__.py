"""Model construction: students, torchvision teachers, and the functional :class:`Model` wrapper.

``build_model(arch, num_classes, image_size, feature_names)`` returns ``(model, params, buffers)``:
a weightless template plus the weights as flat dicts (see :mod:`fkd.models.functional`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fkd.errors import ConfigError
from fkd.models.functional import Model, Params, param_count, size_bytes, split_state
from fkd.models.students import SeedCNN, SmallCNN
from fkd.models.zoo import build_torchvision, feature_node_names, head_prefix, torchvision_names, with_features

STUDENT_ARCHS = ("seed_cnn", "small_cnn")

__all__ = [
    "Model", "Params", "build_model", "param_count", "size_bytes", "split_state", "available_features",
    "head_prefix", "STUDENT_ARCHS", "torchvision_names",
]


def _module(arch: str, num_classes: int, image_size: int, widths, batch_norm: bool, weights: str) -> nn.Module:
    if arch == "seed_cnn":
        return SeedCNN(num_classes, image_size)
    if arch == "small_cnn":
        return SmallCNN(num_classes, tuple(widths), batch_norm)
    if arch not in torchvision_names():
        raise ConfigError(
            f"unknown model '{arch}'; valid models: seed_cnn, small_cnn, or a torchvision classifier "
            f"({', '.join(n for n in torchvision_names() if n.startswith(('resnet', 'mobilenet')))}, ...)."
        )
    return build_torchvision(arch, num_classes, weights)


def available_features(module: nn.Module) -> list[str]:
    """Feature names a module can return: its own ``feature_names`` or its FX node names."""
    own = getattr(module, "feature_names", None)
    return list(own) if own is not None else feature_node_names(module)


def _state_names(module: nn.Module) -> set[str]:
    return {k for k, _ in module.named_parameters()} | {k for k, _ in module.named_buffers()}


def build_model(
    arch: str,
    num_classes: int,
    image_size: int,
    feature_names: tuple[str, ...] | list[str] = (),
    *,
    widths=(16, 32),
    batch_norm: bool = True,
    weights: str = "none",
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[Model, Params, Params]:
    """Build ``arch`` and return ``(model, params, buffers)``.

    Args:
        arch: ``seed_cnn``, ``small_cnn`` or a torchvision classifier name.
        num_classes: output classes; a torchvision head is resized to it.
        image_size: input side in pixels (``seed_cnn`` derives its classifier input from it).
        feature_names: intermediate tensors ``apply`` returns -- block names for fkd's own CNNs, FX node
            names (``layer1``, ``layer2.1.relu``) for torchvision models. Unknown names raise a
            :class:`ConfigError` listing the valid ones.
        weights: ``"imagenet"`` (torchvision's default weights) or ``"none"`` (random init).
        seed: initialisation seed; the global RNG is left as it was.
    """
    feature_names = tuple(feature_names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = _module(arch, num_classes, image_size, widths, batch_norm, weights)
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
    if own is None:  # torchvision: an FX graph per mode returning {logits, features} as one dict
        train_t = with_features(copy.deepcopy(module), feature_names, train=True)
        eval_t = with_features(module, feature_names, train=False)
        returns_dict = True
    else:
        train_t, eval_t, returns_dict = module.train(), copy.deepcopy(module).eval(), False
    spec = {"arch": arch, "num_classes": num_classes, "image_size": image_size,
            "widths": list(widths), "batch_norm": batch_norm}
    names = set(params) | set(buffers)
    pruned = {mode: frozenset(names - _state_names(t)) for mode, t in ((True, train_t), (False, eval_t))}
    model = Model(arch=arch, num_classes=num_classes, feature_names=feature_names, train_template=train_t,
                  eval_template=eval_t, returns_dict=returns_dict, image_size=image_size, spec=spec,
                  pruned={mode: p for mode, p in pruned.items() if p})
    return model, params, buffers
