"""Your own ``nn.Module`` named as ``module:Name`` in ``student.arch`` / ``teacher.arch``.

``"mylab.nets:TinyNet"`` imports the module ``mylab.nets`` (from ``sys.path``: the working directory, an
installed package, ``PYTHONPATH``) and takes its attribute ``TinyNet``, which is either

* an ``nn.Module`` **class** whose constructor takes ``num_classes`` (and ``image_size`` when it has such
  a parameter): its other parameters with a default, and its keyword-only ones, are the model's options,
  keys of ``[student]`` / ``[teacher]`` like any builder's (their help is the ``Args:`` line of the class's
  or ``__init__``'s docstring); or
* a **builder** ``builder(num_classes, image_size, *, option=default, ...) -> nn.Module``, the same contract
  as an entry of :data:`fkd.models.MODELS` (which ``@MODELS.register("name")`` in a ``distill.imports``
  file adds under a plain name instead).

The module's ``forward(x)`` takes images ``(B, 3, H, W)`` and returns logits ``(B, K)``; features are then
its FX node names (``layer1``, ``blocks.2.act``, and ``embedding``: the input of its last ``nn.Linear``),
extracted as for torchvision models (:func:`fkd.models.zoo.with_features`). A module that returns
``(logits, {name: tensor})`` itself declares those names in a ``feature_names`` class attribute, like fkd's
own students. docs/own_models.md has the example (``docs/examples/my_model.py``).

Importing runs the module's code, as ``distill.imports`` does: name only modules you trust.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Callable

from torch import nn

from fkd.errors import ConfigError, shorten

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
#: ``prefix:`` forms that name models of a library rather than a module (``timm:resnet18``).
RESERVED = ("timm",)

_builders: dict[str, Callable[..., nn.Module]] = {}


def is_module_path(arch: str) -> bool:
    """Whether ``arch`` is written ``module:Name`` (and not a reserved ``library:`` form)."""
    module, sep, name = str(arch).partition(":")
    return bool(sep) and module not in RESERVED


def builder_from_path(arch: str, *, key: str = "arch") -> Callable[..., nn.Module]:
    """``builder(num_classes, image_size, **options) -> nn.Module`` for ``arch = "module:Name"``.

    A module that cannot be imported, a missing attribute or one that is neither an ``nn.Module`` class
    nor a callable is a one-sentence :class:`ConfigError` naming ``key``.
    """
    if arch in _builders:
        return _builders[arch]
    module_name, _, name = arch.partition(":")
    if not _DOTTED.match(module_name) or not name.isidentifier():
        raise ConfigError(f"{key} = '{shorten(arch)}' is not of the form module:Name (an importable module path and "
                          "an attribute, e.g. 'mylab.nets:TinyNet').")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(f"{key} = '{arch}': module '{module_name}' cannot be found; put its folder on "
                              "PYTHONPATH (the working directory is on it), or register the model in a file named in "
                              "distill.imports.") from None
        raise ConfigError(f"{key} = '{arch}': importing '{module_name}' failed: {exc}.") from None
    except Exception as exc:  # the user's code: one line, whatever it raised
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"{key} = '{arch}': importing '{module_name}' failed: {type(exc).__name__}: "
                          f"{shorten(reason, 200)}.") from None
    obj = getattr(module, name, None)
    if obj is None:
        raise ConfigError(f"{key} = '{arch}': module '{module_name}' has no attribute '{name}'; name an nn.Module "
                          "class or a builder function defined there.")
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        builder = class_builder(obj, f"{key} = '{arch}'")
    elif callable(obj) and not isinstance(obj, type):
        builder = obj
    else:
        raise ConfigError(f"{key} = '{arch}' is neither an nn.Module class nor a builder function; name one.")
    _builders[arch] = builder
    return builder


def class_builder(cls: type[nn.Module], where: str) -> Callable[..., nn.Module]:
    """A builder for an ``nn.Module`` class: ``num_classes`` (and ``image_size`` when the constructor takes it)
    are passed by name, the constructor's other parameters are the options (its signature, made
    keyword-only, is the builder's, so :func:`fkd.registry.options_of` and ``--keys`` read them)."""
    params = list(inspect.signature(cls).parameters.values())
    names = [p.name for p in params]
    if "num_classes" not in names and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise ConfigError(f"{where}: the constructor of {cls.__name__} has no num_classes parameter; add one (fkd "
                          "passes the data set's class count).")
    takes_size = "image_size" in names
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    options = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params
               if p.name not in ("num_classes", "image_size") and p.kind in kinds]
    missing = [p.name for p in options if p.default is inspect.Parameter.empty]
    if missing:
        raise ConfigError(f"{where}: the constructor of {cls.__name__} needs '{missing[0]}', which has no default; "
                          "give it one (the config sets it as an option).")

    def build(num_classes: int, image_size: int, **opts) -> nn.Module:
        return cls(num_classes=num_classes, **({"image_size": image_size} if takes_size else {}), **opts)

    positional = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("num_classes", "image_size")]
    build.__signature__ = inspect.Signature(positional + options)
    build.__doc__ = inspect.getdoc(cls.__init__) if "Args:" in (inspect.getdoc(cls.__init__) or "") else inspect.getdoc(cls)
    build.__name__ = build.__qualname__ = cls.__name__
    build.__module__ = cls.__module__
    return build
