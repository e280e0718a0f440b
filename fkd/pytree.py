"""Helpers for the flat parameter pytrees fkd uses: ``dict[str, Tensor]``.

Parameters and buffers are plain dicts keyed by the module's dotted names (``"conv.0.weight"``).
Nested dicts (e.g. ``{"model": {...}, "objective": {...}}``) are walked recursively.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Tree = Any


def tree_map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leaf-wise over dicts/lists/tuples with matching structure (like ``jax.tree.map``).

    ``None`` leaves stay ``None``.
    """
    if isinstance(tree, dict):
        return {k: tree_map(fn, v, *(r[k] for r in rest)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(tree_map(fn, v, *(r[i] for r in rest)) for i, v in enumerate(tree))
    if tree is None:
        return None
    return fn(tree, *rest)


def tree_leaves(tree: Tree) -> list[Any]:
    """The leaves of ``tree`` in a deterministic order (dict insertion order)."""
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in tree_leaves(v)]
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return [leaf for v in tree for leaf in tree_leaves(v)]
    if tree is None:
        return []
    return [tree]


def tree_unflatten_like(tree: Tree, leaves: list[Any]) -> Tree:
    """Rebuild ``tree``'s structure with ``leaves`` (the inverse of :func:`tree_leaves`)."""
    it = iter(leaves)
    out = tree_map(lambda _: next(it), tree)
    return out


def tree_clone(tree: Tree) -> Tree:
    """A deep copy of every tensor leaf (detached)."""
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree)


def tree_to(tree: Tree, device: torch.device | str) -> Tree:
    """Move every tensor leaf to ``device``."""
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)


def tree_signature(tree: Tree, prefix: str = "") -> dict[str, tuple]:
    """``{dotted path: (shape, dtype)}`` of every tensor leaf: what two trees must share to be swapped.

    Empty containers count too (as ``("empty",)``): ``{"objective": {}}`` and ``{}`` differ.
    """
    if isinstance(tree, (dict, list, tuple)) and not hasattr(tree, "_fields") and len(tree) == 0:
        return {prefix.rstrip("."): ("empty",)}
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(tree_signature(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        out = {}
        for i, v in enumerate(tree):
            out.update(tree_signature(v, f"{prefix}{i}."))
        return out
    if isinstance(tree, torch.Tensor):
        return {prefix.rstrip("."): (tuple(tree.shape), tree.dtype)}
    return {prefix.rstrip("."): (type(tree).__name__,)}
