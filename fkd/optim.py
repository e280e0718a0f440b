"""Optimizers as pairs of pure functions, in the style of optax.

An optimizer is a :class:`GradientTransformation`, a named tuple of two functions::

    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    params = apply_updates(params, updates)          # params + updates

``params``, ``grads`` and ``updates`` are pytrees of tensors (in fkd, flat ``dict[str, Tensor]``).
Nothing is hidden in an object: all that an optimizer remembers between steps, the step count
included, is in ``state``, which is a pytree of tensors made of dicts and tuples only. It can therefore
be saved with ``torch.save`` and read back with ``torch.load(weights_only=True)``, mapped over with
``torch.func.vmap``, and passed through a ``torch.compile``-d step. The step count is an int64 0-d tensor
on the parameters' device, never a Python int, so a compiled step does not recompile as it advances.

Every function is pure: the caller's params, grads and state are read, never written. New state and
updates are new tensors.

Sign convention (optax's): ``update`` returns the change to add to the parameters, so the final
learning-rate scaling multiplies by ``-learning_rate``.

Small transformations compose with :func:`chain` into the named optimizers::

    sgd   = chain(add_decayed_weights(wd), trace(momentum, nesterov), scale_by_learning_rate(lr))
    adam  = chain(add_decayed_weights(wd), scale_by_adam(b1, b2, eps), scale_by_learning_rate(lr))
    adamw = chain(scale_by_adam(b1, b2, eps), add_decayed_weights(wd), scale_by_learning_rate(lr))

Where the weight decay goes is the whole difference between Adam's coupled L2 penalty (decayed weights
join the gradient before the moment estimates) and AdamW's decoupled decay (they are added to Adam's
normalised step). Each named optimizer matches its ``torch.optim`` counterpart step for step.

``learning_rate`` is a float or a schedule, ``schedule(count) -> 0-d tensor`` (see
:mod:`fkd.schedules`).

A config names its optimizer (``train.optimizer.name``) from the registry :data:`OPTIMIZERS`;
:func:`optimizer_from_config` builds it with its schedule. A new optimizer is one function here, composed
with :func:`chain` and decorated ``@OPTIMIZERS.register("name")``; the config keys it may take are its
keyword parameters after ``learning_rate`` (see :func:`fkd.registry.options_of`).

Arithmetic runs over the whole list of leaves at once with ``torch._foreach_*`` kernels (one call per
operation, not one per tensor). ``vmap`` has no batching rules for those kernels, so under a functorch
transform the same operation runs leaf by leaf instead; see :func:`_foreach`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import attrs
import torch
from torch import Tensor

from fkd.errors import ConfigError
from fkd.pytree import tree_leaves, tree_map, tree_unflatten_like
from fkd.registry import Registry, options_of, resolve_options
from fkd.schedules import SCHEDULES, Schedule, learning_rate_schedule

if TYPE_CHECKING:  # annotations only: fkd.config looks optimizer names up here, so imports go one way
    from fkd.config import OptimizerConfig

Params = Any  # a pytree of tensors; in fkd a flat dict[str, Tensor]
Updates = Any  # same structure as Params
OptState = Any  # a pytree of tensors built from dicts and tuples
ScalarOrSchedule = float | Schedule


class GradientTransformation(NamedTuple):
    """An optimizer, or a piece of one: ``init(params) -> state`` and
    ``update(updates, state, params=None) -> (updates, state)``."""

    init: Callable[[Params], OptState]
    update: Callable[..., tuple[Updates, OptState]]


# ---------------------------------------------------------------------------------------------------
# Lists of leaves
# ---------------------------------------------------------------------------------------------------


def _leaves(tree: Any, like: Any) -> list[Tensor]:
    """The leaves of ``tree`` in the order of ``like``'s leaves.

    Dicts are matched by key, so grads, params and state line up even if their dicts were built in
    different orders.
    """
    return tree_leaves(tree_map(lambda _, leaf: leaf, like, tree))


def _use_foreach(args: tuple[Any, ...]) -> bool:
    """Whether the ``torch._foreach_*`` kernels can run on these arguments.

    They cannot under ``vmap``: functorch has no batching rules for them and no fallback
    ("Batching rule not implemented for aten::_foreach_mul..."). Eagerly we take the leaf-by-leaf path
    under any functorch transform (one cheap query); only vmap needs it, but the others lose little.
    """
    if torch.compiler.is_compiling():
        # Dynamo cannot trace the level query below, but it answers this per-tensor question while
        # tracing, so the choice costs nothing in the compiled graph.
        tensors = [t for a in args for t in (a if isinstance(a, list) else [a]) if isinstance(t, Tensor)]
        return not any(torch._C._functorch.is_batchedtensor(t) for t in tensors)
    return torch._C._functorch.maybe_current_level() is None


def _foreach(op: str, *args: Any, **kwargs: Any) -> list[Tensor]:
    """``torch._foreach_<op>(*args, **kwargs)``, or the same op leaf by leaf under a functorch transform.

    Arguments that are lists are taken element-wise; anything else (a Python number, a 0-d tensor) is
    passed to every call. ``op`` is an out-of-place tensor method (``"mul"``, ``"add"``, ``"lerp"``,
    ...), so the results are always new tensors.
    """
    lists = [a for a in args if isinstance(a, list)]
    if not lists[0]:
        return []
    if _use_foreach(args):
        return list(getattr(torch, f"_foreach_{op}")(*args, **kwargs))
    method = getattr(Tensor, op)
    return [
        method(*(a[i] if isinstance(a, list) else a for a in args), **kwargs) for i in range(len(lists[0]))
    ]


def _zero_count(leaves: list[Tensor]) -> Tensor:
    """A fresh step count: int64 zero on the leaves' device."""
    device = leaves[0].device if leaves else None
    return torch.zeros((), dtype=torch.int64, device=device)


def _float_dtype(leaves: list[Tensor]) -> torch.dtype:
    """The dtype for scalar arithmetic on these leaves: at least float32, float64 if any leaf is."""
    dtype = torch.float32
    for leaf in leaves:
        dtype = torch.promote_types(dtype, leaf.dtype)
    return dtype


# ---------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------


def identity() -> GradientTransformation:
    """Leaves updates unchanged; its state is ``{}``."""

    def init(params: Params) -> OptState:
        return {}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        return updates, state

    return GradientTransformation(init, update)


def scale(step_size: float) -> GradientTransformation:
    """Multiplies updates by a constant: ``u <- step_size * u``. State ``{}``."""
    step_size = float(step_size)

    def init(params: Params) -> OptState:
        return {}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        leaves = tree_leaves(updates)
        return tree_unflatten_like(updates, _foreach("mul", leaves, step_size)), state

    return GradientTransformation(init, update)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule) -> GradientTransformation:
    """The descent step: ``u <- -lr(count) * u``, then ``count <- count + 1``.

    ``learning_rate`` is a float or a schedule; a schedule sees the number of updates made before this
    one, so the first update uses ``learning_rate(0)``. State: ``{"count": int64 0-d tensor}``; the count
    is kept for a float learning rate too, so the state's layout does not depend on which kind is given.
    """
    if not callable(learning_rate):
        learning_rate = float(learning_rate)
        if learning_rate < 0:
            raise ConfigError(f"learning_rate must be >= 0, got {learning_rate}.")

    def init(params: Params) -> OptState:
        return {"count": _zero_count(tree_leaves(params))}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        count = state["count"]
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        leaves = tree_leaves(updates)
        return tree_unflatten_like(updates, _foreach("mul", leaves, -lr)), {"count": count + 1}

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: float) -> GradientTransformation:
    """Adds the L2 penalty's gradient: ``u <- u + weight_decay * p``. Needs ``params``. State ``{}``.

    Placed before a preconditioner (as in :func:`adam`) this is the coupled L2 regularisation of
    ``torch.optim.Adam(weight_decay=...)`` and of SGD; placed after it, before the learning rate (as in
    :func:`adamw`), it is the decoupled weight decay of Loshchilov & Hutter 2019.
    """
    weight_decay = float(weight_decay)
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}.")

    def init(params: Params) -> OptState:
        return {}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        if weight_decay == 0.0:
            return updates, state
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(updates, state, params).")
        leaves = tree_leaves(updates)
        decayed = _foreach("add", leaves, _leaves(params, updates), alpha=weight_decay)
        return tree_unflatten_like(updates, decayed), state

    return GradientTransformation(init, update)


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum, in PyTorch's SGD formulation (Sutskever et al. 2013)::

        b <- decay * b + u
        u <- b                      (classical momentum)
        u <- u + decay * b          (nesterov=True)

    The learning rate is applied afterwards, outside the buffer, as ``torch.optim.SGD`` does
    (with ``dampening=0``). State: ``{"trace": b}`` with ``b`` zeros like params.
    """
    decay = float(decay)
    if decay < 0:
        raise ConfigError(f"momentum must be >= 0, got {decay}.")

    def init(params: Params) -> OptState:
        return {"trace": tree_map(torch.zeros_like, params)}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        grads = tree_leaves(updates)
        buf = _foreach("add", grads, _leaves(state["trace"], updates), alpha=decay)
        out = _foreach("add", grads, buf, alpha=decay) if nesterov else buf
        return tree_unflatten_like(updates, out), {"trace": tree_unflatten_like(updates, buf)}

    return GradientTransformation(init, update)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's preconditioning (Kingma & Ba 2015, Algorithm 1), without the learning rate::

        count <- count + 1
        m <- b1 * m + (1 - b1) * u            first moment (computed as lerp(m, u, 1 - b1))
        v <- b2 * v + (1 - b2) * u * u        second moment
        u <- (m / (1 - b1**count)) / (sqrt(v / (1 - b2**count)) + eps)

    The bias corrections ``1 - b**count`` are tensor ops on the count, in float64 when the leaves are
    float64 and in float32 otherwise. State: ``{"mu": m, "nu": v, "count": int64 0-d tensor}``.
    """
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ConfigError(f"adam needs 0 <= b1 < 1 and 0 <= b2 < 1, got b1={b1}, b2={b2}.")
    if eps < 0:
        raise ConfigError(f"eps must be >= 0, got {eps}.")
    b1, b2, eps = float(b1), float(b2), float(eps)

    def init(params: Params) -> OptState:
        return {
            "mu": tree_map(torch.zeros_like, params),
            "nu": tree_map(torch.zeros_like, params),
            "count": _zero_count(tree_leaves(params)),
        }

    def update(updates: Updates, state: OptState, params: Params | None = None):
        grads = tree_leaves(updates)
        mu = _foreach("lerp", _leaves(state["mu"], updates), grads, 1.0 - b1)
        nu = _foreach("mul", _leaves(state["nu"], updates), b2)
        nu = _foreach("addcmul", nu, grads, grads, value=1.0 - b2)
        count = state["count"] + 1
        t = count.to(_float_dtype(grads))
        bias1 = 1.0 - b1**t
        bias2_sqrt = torch.sqrt(1.0 - b2**t)
        # sqrt(v / c2) computed as sqrt(v) / sqrt(c2), as torch.optim.Adam does, to agree to rounding.
        denom = _foreach("add", _foreach("div", _foreach("sqrt", nu), bias2_sqrt), eps)
        out = _foreach("div", _foreach("div", mu, bias1), denom)
        new_state = {
            "mu": tree_unflatten_like(updates, mu),
            "nu": tree_unflatten_like(updates, nu),
            "count": count,
        }
        return tree_unflatten_like(updates, out), new_state

    return GradientTransformation(init, update)


def global_norm(tree: Any) -> Tensor:
    """The L2 norm of all leaves taken as one vector: ``sqrt(sum_i ||x_i||^2)``, a 0-d tensor.

    Computed as the norm of the per-leaf norms, as ``torch.nn.utils.clip_grad_norm_`` does.
    """
    leaves = tree_leaves(tree)
    if not leaves:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(_foreach("norm", leaves)))


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Rescales updates whose global norm exceeds ``max_norm`` (Pascanu et al. 2013)::

        u <- u * min(1, max_norm / (global_norm(u) + 1e-6))

    the formula of ``torch.nn.utils.clip_grad_norm_``. The factor stays a tensor (never read on the
    host, so no synchronisation); updates already within the bound are multiplied by exactly 1. State ``{}``.
    """
    max_norm = float(max_norm)
    if max_norm <= 0:
        raise ConfigError(f"clip_by_global_norm needs max_norm > 0, got {max_norm}.")

    def init(params: Params) -> OptState:
        return {}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        leaves = tree_leaves(updates)
        if not leaves:
            return updates, state
        factor = torch.clamp(max_norm / (global_norm(leaves) + 1e-6), max=1.0)
        return tree_unflatten_like(updates, _foreach("mul", leaves, factor)), state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies ``transforms`` one after the other; the state is the tuple of their states."""

    def init(params: Params) -> OptState:
        return tuple(t.init(params) for t in transforms)

    def update(updates: Updates, state: OptState, params: Params | None = None):
        if len(state) != len(transforms):
            raise ValueError(f"chain of {len(transforms)} transforms got a state of {len(state)} members.")
        new_state = []
        for transform, member_state in zip(transforms, state):
            updates, member_state = transform.update(updates, member_state, params)
            new_state.append(member_state)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


# ---------------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------------

OPTIMIZERS = Registry("optimizer", "optimizer.name")
"""``optimizer.name`` names: ``entry(learning_rate, **options) -> GradientTransformation``, where ``options``
are the entry's keyword parameters, set as keys of ``[train.optimizer]`` (see :func:`optimizer_from_config`)."""


@OPTIMIZERS.register("sgd")
def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """Stochastic gradient descent, step for step as ``torch.optim.SGD`` (``dampening=0``)::

        g <- g + weight_decay * p
        b <- momentum * b + g;  d = b, or d = g + momentum * b with nesterov     (only if momentum > 0)
        p <- p - lr * d

    Momentum and its Nesterov variant as formulated by Sutskever et al. 2013 and PyTorch's SGD.
    State: ``({}, {"trace": b} or {}, {"count": ...})``, the states of the chained parts.
    """
    if nesterov and momentum <= 0:
        raise ConfigError("sgd with nesterov=True needs momentum > 0.")
    return chain(
        add_decayed_weights(weight_decay),
        trace(momentum, nesterov) if momentum > 0 else identity(),
        scale_by_learning_rate(learning_rate),
    )


@OPTIMIZERS.register("adam")
def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """Adam (Kingma & Ba 2015), step for step as ``torch.optim.Adam``, with its coupled weight decay::

        g <- g + weight_decay * p                       (an L2 penalty: enters the moments)
        p <- p - lr * scale_by_adam(g)

    State: ``({}, {"mu", "nu", "count"}, {"count"})``.
    """
    return chain(
        add_decayed_weights(weight_decay),
        scale_by_adam(b1, b2, eps),
        scale_by_learning_rate(learning_rate),
    )


@OPTIMIZERS.register("adamw")
def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter 2019), step for step as ``torch.optim.AdamW``::

        p <- p - lr * (scale_by_adam(g) + weight_decay * p)

    The decay bypasses the moment estimates and is scaled by the (scheduled) learning rate, which is
    ``torch.optim.AdamW``'s ``p <- p * (1 - lr * weight_decay)`` followed by the Adam step.
    State: ``({"mu", "nu", "count"}, {}, {"count"})``.
    """
    return chain(
        scale_by_adam(b1, b2, eps),
        add_decayed_weights(weight_decay),
        scale_by_learning_rate(learning_rate),
    )


def apply_updates(params: Params, updates: Updates) -> Params:
    """``params + updates``, leaf by leaf, as new tensors; each result keeps its parameter's dtype."""
    p = tree_leaves(params)
    u = [ui if ui.dtype == pi.dtype else ui.to(pi.dtype) for pi, ui in zip(p, _leaves(updates, params))]
    return tree_unflatten_like(params, _foreach("add", p, u))



def optimizer_from_config(
    cfg: OptimizerConfig, steps_per_epoch: int, epochs: int, *, key: str = "train.optimizer"
) -> tuple[GradientTransformation, Schedule]:
    """``(optimizer, schedule)`` for an ``[optimizer]`` table of a run config.

    The optimizer is ``OPTIMIZERS.get(cfg.name)(schedule, **options)``: ``cfg.options`` are checked by
    :func:`~fkd.registry.resolve_options` against the keyword parameters of the optimizer and of the
    schedule, and each gets those it takes; the schedule is :func:`~fkd.schedules.learning_rate_schedule`
    over ``epochs * steps_per_epoch`` steps. A key neither takes, set to anything but another entry's
    default, is a :class:`ConfigError` naming ``<key>.<field>`` (``key`` is ``train.optimizer`` or
    ``teacher.train.optimizer``): momentum does nothing to adam, and a silent no-op would hide the
    mistake. With ``clip_norm > 0``, :func:`clip_by_global_norm` is chained first, whatever the
    optimizer, as ``torch.nn.utils.clip_grad_norm_`` runs before ``optimizer.step()``.
    """
    fixed = tuple(k for k in attrs.fields_dict(type(cfg)) if k != "options")
    options = resolve_options(cfg.options, [(OPTIMIZERS, cfg.name), (SCHEDULES, cfg.schedule)], prefix=key,
                              fixed=fixed)
    cfg = attrs.evolve(cfg, options=options)
    schedule = learning_rate_schedule(cfg, steps_per_epoch, epochs, key=key)
    entry = OPTIMIZERS.get(cfg.name)
    opt = entry(schedule, **{k: v for k, v in options.items() if k in options_of(entry)})
    if cfg.clip_norm > 0:
        opt = chain(clip_by_global_norm(cfg.clip_norm), opt)
    return opt, schedule
