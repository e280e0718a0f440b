"""Torchvision classification models by name, with their head resized and features by FX node name."""

from __future__ import annotations

import warnings

import torch
import torch.fx
import torchvision
from torch import nn
from torchvision.models.feature_extraction import (NodePathTracer, _set_default_tracer_kwargs,
                                                   create_feature_extractor, get_graph_node_names)

from fkd.errors import CheckpointError, ConfigError


def torchvision_names() -> list[str]:
    """Every torchvision image-classification model name (``resnet18``, ``mobilenet_v3_small``, ...)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_torchvision(arch: str, num_classes: int, weights: str = "none") -> nn.Module:
    """A torchvision classifier whose last ``nn.Linear`` is replaced by a fresh one with ``num_classes``.

    ``weights="imagenet"`` loads torchvision's default weights enum for ``arch`` (from torchvision's cache,
    ``$TORCH_HOME/hub/checkpoints``, downloading when online). Offline with no cached file this raises a
    :class:`CheckpointError` that says where the file should be.
    """
    if arch not in torchvision_names():
        raise ConfigError(f"'{arch}' is not a torchvision classifier; use one such as resnet18, "
                          "mobilenet_v3_small, efficientnet_b0 (fkd's own models: fkd.models.MODELS).")
    if weights in ("imagenet", "pretrained"):
        enum = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            model = torchvision.models.get_model(arch, weights=enum)
        except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
            file = enum.url.rsplit("/", 1)[-1]
            where = f"{torch.hub.get_dir()}/checkpoints/{file}"
            raise CheckpointError(
                f"ImageNet weights for {arch} are not in torchvision's cache ({where}) and could not be "
                f"downloaded ({type(exc).__name__}); run once with network access, copy the file there, "
                f"or set teacher.weights = 'none'."
            ) from None
    else:
        model = torchvision.models.get_model(arch, weights=None)
    _replace_head(model, num_classes)
    return model


def head_prefix(module: nn.Module) -> str:
    """The dotted name of the classifier head (the last ``nn.Linear``), e.g. ``fc`` for a ResNet."""
    linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(module).__name__} has no nn.Linear classifier head that fkd can resize.")
    return linears[-1]


def _replace_head(model: nn.Module, num_classes: int) -> None:
    name = head_prefix(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if old.out_features != num_classes:
        setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _eval_nodes(module: nn.Module, tracer_kwargs: dict | None = None) -> list[str]:
    with warnings.catch_warnings():
        # models with auxiliary heads trace fewer nodes in eval mode; fkd picks one mode per graph
        warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing")
        return get_graph_node_names(module, tracer_kwargs=tracer_kwargs)[1]


#: The feature every model has: the vector its classifier head (the last ``nn.Linear``) reads, (B, D).
EMBEDDING = "embedding"

#: ``<module>.preact``: that module's output before its final ReLU (see :func:`preact_nodes`).
PREACT = "preact"

_RELUS = (torch.relu, torch.nn.functional.relu, torch.relu_)


def _is_relu(node: torch.fx.Node, module: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(module.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELUS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def preact_nodes(module: nn.Module, tracer_kwargs: dict | None = None) -> dict[str, str]:
    """``{"<module>.preact": FX node name}``: for every submodule whose last node (eval-mode graph) is a ReLU,
    the node that ReLU reads -- the submodule's output before its final activation (``layer3.preact`` is
    ``layer3.1.add`` in a torchvision ResNet-18: the residual sum before the block's last ReLU). OFD and AB
    distil these pre-activation features; any other FX node name works as a feature too."""
    was_training = module.training
    tracer = NodePathTracer(**_set_default_tracer_kwargs(tracer_kwargs))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing")
        graph = tracer.trace(module.eval())
    module.train(was_training)
    last: dict[str, torch.fx.Node] = {}
    for node in graph.nodes:
        name = tracer.node_to_qualname.get(node)
        if name is None or node.op in ("placeholder", "output"):
            continue
        parts = name.split(".")
        for i in range(1, len(parts)):  # proper prefixes only: a ReLU node is not its own module's preact
            last[".".join(parts[:i])] = node
    aliases = {}
    for prefix, node in last.items():
        source = node.args[0] if node.args else None
        if _is_relu(node, module) and isinstance(source, torch.fx.Node) and source in tracer.node_to_qualname:
            aliases[f"{prefix}.{PREACT}"] = tracer.node_to_qualname[source]
    return aliases


def feature_node_names(module: nn.Module, tracer_kwargs: dict | None = None) -> list[str]:
    """Names usable as features: submodule names (``layer1``: that block's output) and FX node names
    (``layer2.1.relu``), in forward order as ``get_graph_node_names`` lists them (eval-mode graph), then the
    pre-activation aliases (``layer1.preact``, :func:`preact_nodes`), then :data:`EMBEDDING`.
    ``tracer_kwargs``: FX leaf modules and functions (timm's, see :func:`fkd.models.timm_models.tracer_kwargs`)."""
    nodes = _eval_nodes(module, tracer_kwargs)
    names: list[str] = []
    for node in nodes:
        parts = node.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix not in names:
                names.append(prefix)
    return [*names, *preact_nodes(module, tracer_kwargs), EMBEDDING]


def with_features(module: nn.Module, feature_names: tuple[str, ...], train: bool, *,
                  tracer_kwargs: dict | None = None, logits_node: str | None = None) -> nn.Module:
    """``module`` rewritten by ``create_feature_extractor`` (FX, no hooks) to also return named features.

    The rewritten module returns a dict: ``{LOGITS: logits, name: feature, ...}``; its parameter and buffer
    names are the original module's (``layer1.0.conv1.weight``), so checkpoints stay interchangeable.
    :data:`EMBEDDING` is the input of the classifier head's call in the traced graph (``flatten`` for a
    ResNet, the dropout before ``classifier.3`` for MobileNetV3). Unknown names raise
    :class:`ConfigError` listing the valid node names. ``tracer_kwargs`` as for :func:`feature_node_names`;
    ``logits_node``: the node returned as the logits instead of the graph's last one (a distilled DeiT's
    class-token head in training, see :func:`fkd.models.timm_models.train_logits_node`).
    """
    nodes = feature_node_names(module, tracer_kwargs)
    unknown = [n for n in feature_names if n not in nodes]
    if unknown:
        raise ConfigError(
            f"feature '{unknown[0]}' is not a node of {type(module).__name__}; valid names: {', '.join(nodes)}."
        )
    aliases = {n: node for n, node in preact_nodes(module, tracer_kwargs).items() if n in feature_names}
    for sub in module.modules():
        # A returned feature must not be overwritten by a later in-place activation (torchvision's ResNets use
        # ReLU(inplace=True), which would turn ``layer1.1.add`` -- ``layer1.preact`` -- into its ReLU).
        if getattr(sub, "inplace", False) is True:
            sub.inplace = False
    module.train(train)
    return_nodes = {aliases.get(n, n): aliases.get(n, n) for n in feature_names if n != EMBEDDING}
    return_nodes[logits_node or _eval_nodes(module, tracer_kwargs)[-1]] = LOGITS
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing")
        extractor = create_feature_extractor(module, return_nodes=return_nodes, tracer_kwargs=tracer_kwargs)
    if EMBEDDING in feature_names:
        _return_head_input(extractor, head_prefix(module))
    if aliases:
        output = next(n for n in extractor.graph.nodes if n.op == "output")
        returned = dict(output.args[0])
        output.args = ({**returned, **{alias: returned[node] for alias, node in aliases.items()}},)
        extractor.recompile()
    return extractor.train(train)


def _return_head_input(extractor: torch.fx.GraphModule, head: str) -> None:
    """Add the classifier head's input to the extractor's returned dict as :data:`EMBEDDING`."""
    calls = [n for n in extractor.graph.nodes if n.op == "call_module" and n.target == head]
    if len(calls) != 1:
        raise ConfigError(f"cannot find the one call of the classifier head '{head}' in the traced graph of "
                          f"{type(extractor).__name__}, so it has no '{EMBEDDING}' feature; name a node instead.")
    output = next(n for n in extractor.graph.nodes if n.op == "output")
    output.args = ({**output.args[0], EMBEDDING: calls[0].args[0]},)
    extractor.recompile()


LOGITS = "__logits__"
