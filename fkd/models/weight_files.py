"""Weights from a file: a ``.pth`` / ``.pt`` state dict or a ``.safetensors`` file, for a named architecture.

``teacher.weights`` / ``student.weights`` may name such a file (a fine-tuned torchvision checkpoint, your
own training's ``torch.save(model.state_dict(), path)``). :func:`read_state_dict` reads it -- torch files
with ``torch.load(..., weights_only=True)``, which runs no code from the file; a dict that wraps the state
dict under ``"state_dict"`` or ``"model"`` (what many training scripts save) is unwrapped -- and strips a
key prefix such as ``module.`` (``nn.DataParallel`` / DDP) or ``model.`` (Lightning) when
``weights_prefix`` says so. :func:`fit_state_dict` puts it into a model's ``(params, buffers)`` with
strict matching: every weight of the model must be in the file with its shape, and the file may hold
nothing else. The one exception is the classifier head (the last ``nn.Linear``): a head of another
size (an ImageNet 1000-class head for a 10-class data set) is left freshly initialised, and the caller
says so in one note line.

``safetensors`` is imported only for a ``.safetensors`` file (the ``fkd[safetensors]`` extra).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import attrs
import torch

from fkd.errors import CheckpointError, ConfigError

#: File name endings read as weight files (any other value of ``*.weights`` is a keyword like ``"none"``).
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")

#: Keys under which a saved dict commonly wraps its state dict (``torch.save({"state_dict": sd, "epoch": 3})``).
WRAPPER_KEYS = ("state_dict", "model")

_SHOWN = 3  # keys named per kind of mismatch in an error


def is_weight_file(value: str) -> bool:
    """Whether a ``weights`` value names a file (by its ending) rather than a keyword."""
    return isinstance(value, str) and value.lower().endswith(WEIGHT_SUFFIXES)


def read_state_dict(path: str | Path, *, prefix: str = "", key: str = "weights") -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (tensors on the CPU), with ``prefix`` stripped from its keys.

    ``key`` is the config key that named the file (``teacher.weights``), for messages. A missing or
    unreadable file, a file holding anything but tensors, or a ``prefix`` that starts no key is a
    :class:`CheckpointError` (a ``.safetensors`` file without the package: a :class:`ConfigError`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{key} = '{path}' is not a file; give the path of a .pth, .pt or .safetensors "
                              "state dict (relative to the working directory).")
    state = _read_safetensors(path, key) if path.suffix.lower() == ".safetensors" else _read_torch(path, key)
    state = _unwrapped(state)
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{key} = '{path}' holds no state dict (a dict of weight name -> tensor, optionally "
                              f"under {' or '.join(repr(k) for k in WRAPPER_KEYS)}); save one with "
                              "torch.save(model.state_dict(), path).")
    if prefix:
        if not any(k.startswith(prefix) for k in state):
            raise CheckpointError(f"{key}_prefix = '{prefix}' starts none of the keys in '{path}' (they start like "
                                  f"'{next(iter(state))}'); set it to the prefix the keys have, or to ''.")
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


def _read_torch(path: Path, key: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{key} = '{path}' cannot be read as a torch state dict with weights_only=True "
                              f"({reason[:160]}); save the weights alone with torch.save(model.state_dict(), "
                              "path).") from None


def _read_safetensors(path: Path, key: str):
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ConfigError(f"{key} = '{path}' is a .safetensors file, which needs the safetensors package; "
                          "install it with pip install 'fkd[safetensors]' (or pip install safetensors).") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for a damaged header
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{key} = '{path}' cannot be read as a safetensors file ({reason[:160]}); "
                              "check the file.") from None


def _unwrapped(state):
    """The state dict inside a wrapper dict (``{"state_dict": {...}, "epoch": 3}``), else ``state``."""
    if isinstance(state, dict):
        for wrapper in WRAPPER_KEYS:
            inner = state.get(wrapper)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    return state


@attrs.frozen
class Fitted:
    """Weights from a file placed into a model: new ``params`` / ``buffers``, and ``head`` -- the name of the
    classifier head left freshly initialised because the file's has another size, with that size
    (``("fc", 1000)``), or None."""

    params: dict
    buffers: dict
    head: tuple[str, int] | None = None


def fit_state_dict(state: dict[str, torch.Tensor], params: dict, buffers: dict, *, head: str | None,
                   where: str, fix: str, prefix_key: str = "weights_prefix") -> Fitted:
    """``params`` and ``buffers`` replaced by the tensors of ``state`` (cast to their dtype and device).

    Strict: a weight of the model missing from ``state``, a key of ``state`` the model lacks, or a shape
    that differs is one :class:`CheckpointError` naming the first few of each (``where`` says which file
    and model, ``fix`` what to change, ``prefix_key`` the config key of the prefix). Only the classifier head ``head`` (``fc``: ``fc.weight``,
    ``fc.bias``) may differ in shape; it then keeps its fresh initialisation. The inputs are not mutated.
    """
    model = {**params, **buffers}
    missing = [k for k in model if k not in state]
    unexpected = [k for k in state if k not in model]
    differ = [k for k in model if k in state and tuple(state[k].shape) != tuple(model[k].shape)]
    head_keys = [k for k in differ if head and k.startswith(head + ".")]
    if missing or unexpected or len(head_keys) < len(differ):
        text = _mismatch(missing, unexpected, differ, state, model, prefix_key)
        raise CheckpointError(f"{where} does not fit: {text}; {fix}.")
    keep = set(head_keys)

    def placed(tree: dict) -> dict:
        return {k: v if k in keep else state[k].to(dtype=v.dtype, device=v.device) for k, v in tree.items()}

    fresh_head = None
    if head_keys:
        weight = state.get(f"{head}.weight")
        fresh_head = (head, int(weight.shape[0]) if weight is not None and weight.ndim else -1)
    return Fitted(placed(params), placed(buffers), fresh_head)


def _mismatch(missing: list, unexpected: list, differ: list, state: dict, model: dict, prefix_key: str) -> str:
    parts = []
    if missing:
        parts.append(f"missing {_names(missing)}")
    if unexpected:
        parts.append(f"unexpected {_names(unexpected)}")
    if differ:
        shown = ", ".join(f"'{k}' {tuple(state[k].shape)} in the file, {tuple(model[k].shape)} in the model"
                          for k in differ[:_SHOWN])
        parts.append(f"shape of {shown}" + (f" (+{len(differ) - _SHOWN} more)" if len(differ) > _SHOWN else ""))
    text = "; ".join(parts)
    prefix = _common_prefix(unexpected) if unexpected and missing else ""
    if prefix and all(k.startswith(prefix) for k in state):
        text += f" (every key in the file starts with '{prefix}': set {prefix_key} = '{prefix}')"
    return text


def _names(keys: list) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:_SHOWN])
    return shown + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def _common_prefix(keys: list) -> str:
    """The first dotted component shared by every key (``module.``), or ""."""
    first = {k.split(".", 1)[0] for k in keys if "." in k}
    return f"{first.pop()}." if len(first) == 1 and all("." in k for k in keys) else ""
