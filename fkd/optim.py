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

``learning_rate`` is a number or a schedule, ``schedule(count) -> 0-d tensor`` (see
:mod:`fkd.schedules`). Every number a building block takes (learning rate, momentum, weight decay, betas,
eps, clipping bound) may be a Python float or a 0-d tensor, and no Python branch depends on its value:
ranges are checked on Python numbers only, and a zero momentum or weight decay runs the same ops as any
other value (``u + 0 * b == u`` exactly, so the result is bit for bit the one without them).

Hyperparameters in the state (optax's ``inject_hyperparams``)
--------------------------------------------------------------
:func:`inject_hyperparams` keeps an optimizer's numbers in its state, where the update reads them::

    opt = inject_hyperparams(sgd)(learning_rate=schedule, momentum=0.9, nesterov=True)
    opt.init(params) == {
        "hyperparams": {                      # the values: 0-d tensors (float32; float64 for float64 params)
            "learning_rate": {"init_value": tensor(0.1), "decay_steps": tensor(3900.)},  # schedule's numbers
            "momentum": tensor(0.9),
            "weight_decay": tensor(0.),       # defaults are held too
        },
        "inner": ({}, {"trace": ...}, {"count": ...}),   # sgd(...).init(params)
    }

Static options (bools such as ``nesterov``, strings, lists, plain schedule functions) are the structure
and stay in the closure. Two states that differ only in numbers have the same structure, so members of a
sweep are one stacked state under ``torch.func.vmap`` and one compiled step: build each member's optimizer
from its own config (:func:`optimizer_from_config`), ``init`` each, stack the states leaf by leaf, and run
the ``update`` of any one of them (it reads every number from the state). Read the numbers with
:func:`hyperparams` (``hyperparams(opt_state)["momentum"]``, searched through a :func:`chain`), and set
them with :func:`with_hyperparams` (``with_hyperparams(opt_state, momentum=0.5)``), which returns a new
state. The learning rate a config's schedule gives at a step is
:func:`fkd.schedules.current_lr` of the schedule, the count and ``hyperparams(opt_state)["learning_rate"]``.

A config names its optimizer (``train.optimizer.name``) from the registry :data:`OPTIMIZERS`;
:func:`optimizer_from_config` builds it with its schedule, injected. A new optimizer is one function here
or in a user's file, composed with :func:`chain` and decorated ``@OPTIMIZERS.register("name")``; the
config keys it may take are its keyword parameters after ``learning_rate`` (see
:func:`fkd.registry.options_of`). Its numeric keyword options land in the state with no more effort than
building from the blocks here (or other tensor-friendly ops) and building the same state whatever the
numbers.

Arithmetic runs over the whole list of leaves at once with ``torch._foreach_*`` kernels (one call per
operation, not one per tensor). ``vmap`` has no batching rules for those kernels, so under a functorch
transform the same operation runs leaf by leaf instead; see :func:`_foreach`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import attrs
import torch
from torch import Tensor

from fkd.errors import ConfigError
from fkd.pytree import tree_leaves, tree_map, tree_unflatten_like
from fkd.registry import Registry, options_of, resolve_options
from fkd.schedules import SCHEDULES, InjectableSchedule, Schedule, learning_rate_schedule

if TYPE_CHECKING:  # annotations only: fkd.config looks optimizer names up here, so imports go one way
    from fkd.config import OptimizerConfig

Params = Any  # a pytree of tensors; in fkd a flat dict[str, Tensor]
Updates = Any  # same structure as Params
OptState = Any  # a pytree of tensors built from dicts and tuples
Number = float | Tensor  # a Python number, or a 0-d tensor (an injected hyperparameter)
ScalarOrSchedule = float | Tensor | Schedule


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


def _python(*values: Any) -> bool:
    """Whether none of ``values`` is a tensor. Ranges are checked only then: on the Python numbers a config
    gives, before :func:`inject_hyperparams` turns them into tensors, never on a tensor in a traced update
    (its value is unknown while tracing, and reading it would sync with the device)."""
    return not any(isinstance(v, Tensor) for v in values)


def _check_unit_interval(**values: Any) -> None:
    """A config's Python number outside [0, 1] is a :class:`ConfigError` naming the option (tensors pass:
    they were checked as numbers before injection)."""
    for name, value in values.items():
        if _python(value) and not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must be within [0, 1] (got {value}).")


def _number(value: Any) -> Number:
    """A Python number as a float; a tensor (an injected hyperparameter) as it is."""
    return value if isinstance(value, Tensor) else float(value)


def _per_leaf_weight(xs: list[Tensor], weight: Number) -> bool:
    """Whether to pass a 0-d tensor ``weight`` as a list of it, one per leaf, to a ``List`` foreach kernel.

    ``add(alpha=)``, ``lerp(weight=)`` and ``addcmul(value=)`` take a Python number only (a tensor there is
    read on the host, a sync). Eagerly on CPUs foreach kernels run tensor by tensor anyway, so the weight
    broadcast from a list costs nothing and saves a pass; on CUDA a list of 0-d weights leaves the fused
    multi-tensor path, and under ``torch.compile`` Inductor fuses a separate ``mul`` into the ``add`` while
    it lowers the list form less well, so there a separate ``mul`` is cheaper. Under vmap :func:`_foreach`
    goes leaf by leaf either way.
    """
    return (isinstance(weight, Tensor) and bool(xs) and xs[0].device.type == "cpu"
            and not torch.compiler.is_compiling())


def _add_scaled(xs: list[Tensor], ys: list[Tensor], alpha: Number) -> list[Tensor]:
    """``x + alpha * y`` leaf by leaf, for a Python or a 0-d tensor ``alpha``.

    For a tensor ``alpha``, ``addcmul(x, y, alpha)`` on CPUs and ``x + (y * alpha)`` (two kernels) elsewhere
    (see :func:`_per_leaf_weight`); the same roundings either way. With ``alpha = 0`` the result is ``x``
    exactly (``x + 0 * y == x`` for finite ``y``), so a zero momentum or weight decay changes nothing.
    """
    if not isinstance(alpha, Tensor):
        return _foreach("add", xs, ys, alpha=alpha)
    if _per_leaf_weight(xs, alpha):
        return _foreach("addcmul", xs, ys, [alpha] * len(xs))
    return _foreach("add", xs, _foreach("mul", ys, alpha))


def _lerp(xs: list[Tensor], ys: list[Tensor], weight: Number) -> list[Tensor]:
    """``x + weight * (y - x)`` leaf by leaf (``torch.lerp``), for a Python or a 0-d tensor ``weight``.

    For a tensor ``weight`` off CPUs, computed as ``x * (1 - weight) + y * weight`` (see
    :func:`_per_leaf_weight`), which agrees with ``lerp`` to rounding.
    """
    if not isinstance(weight, Tensor):
        return _foreach("lerp", xs, ys, weight)
    if _per_leaf_weight(xs, weight):
        return _foreach("lerp", xs, ys, [weight] * len(xs))
    return _add_scaled(_foreach("mul", xs, 1.0 - weight), ys, weight)


def _add_number(xs: list[Tensor], value: Number) -> list[Tensor]:
    """``x + value`` leaf by leaf. A 0-d tensor ``value`` goes in as a list of it under ``torch.compile``,
    where Inductor fuses that form into the neighbouring ops and does not fuse ``_foreach_add.Tensor``
    (measured: Adam's update twice as slow on CPU with a tensor ``eps``)."""
    if isinstance(value, Tensor) and torch.compiler.is_compiling():
        return _foreach("add", xs, [value] * len(xs))
    return _foreach("add", xs, value)


def _addcmul(xs: list[Tensor], ys: list[Tensor], zs: list[Tensor], value: Number) -> list[Tensor]:
    """``x + value * y * z`` leaf by leaf; a 0-d tensor ``value`` scales ``y`` first (one more kernel),
    as ``addcmul``'s ``value`` is a Python number only."""
    if not isinstance(value, Tensor):
        return _foreach("addcmul", xs, ys, zs, value=value)
    return _foreach("addcmul", xs, _foreach("mul", ys, value), zs)


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


def scale(step_size: Number) -> GradientTransformation:
    """Multiplies updates by a constant: ``u <- step_size * u``. State ``{}``."""
    step_size = _number(step_size)

    def init(params: Params) -> OptState:
        return {}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        leaves = tree_leaves(updates)
        return tree_unflatten_like(updates, _foreach("mul", leaves, step_size)), state

    return GradientTransformation(init, update)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule) -> GradientTransformation:
    """The descent step: ``u <- -lr(count) * u``, then ``count <- count + 1``.

    ``learning_rate`` is a number (a float or a 0-d tensor) or a schedule; a schedule sees the number of
    updates made before this one, so the first update uses ``learning_rate(0)``. State:
    ``{"count": int64 0-d tensor}``; the count is kept for a constant learning rate too, so the state's
    layout does not depend on which kind is given.
    """
    if not callable(learning_rate):
        learning_rate = _number(learning_rate)
        if _python(learning_rate) and learning_rate < 0:
            raise ConfigError(f"learning_rate must be >= 0, got {learning_rate}.")

    def init(params: Params) -> OptState:
        return {"count": _zero_count(tree_leaves(params))}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        count = state["count"]
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        leaves = tree_leaves(updates)
        return tree_unflatten_like(updates, _foreach("mul", leaves, -lr)), {"count": count + 1}

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: Number) -> GradientTransformation:
    """Adds the L2 penalty's gradient: ``u <- u + weight_decay * p``. Needs ``params``. State ``{}``.

    Placed before a preconditioner (as in :func:`adam`) this is the coupled L2 regularisation of
    ``torch.optim.Adam(weight_decay=...)`` and of SGD; placed after it, before the learning rate (as in
    :func:`adamw`), it is the decoupled weight decay of Loshchilov & Hutter 2019. It runs whatever the
    value, so a weight decay of 0 and one of 5e-4 are the same computation (0 leaves ``u`` exactly as it was).
    """
    weight_decay = _number(weight_decay)
    if _python(weight_decay) and weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}.")

    def init(params: Params) -> OptState:
        return {}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(updates, state, params).")
        leaves = tree_leaves(updates)
        decayed = _add_scaled(leaves, _leaves(params, updates), weight_decay)
        return tree_unflatten_like(updates, decayed), state

    return GradientTransformation(init, update)


def trace(decay: Number, nesterov: bool = False) -> GradientTransformation:
    """Heavy-ball momentum, in PyTorch's SGD formulation (Sutskever et al. 2013)::

        b <- decay * b + u
        u <- b                      (classical momentum)
        u <- u + decay * b          (nesterov=True)

    The learning rate is applied afterwards, outside the buffer, as ``torch.optim.SGD`` does
    (with ``dampening=0``). State: ``{"trace": b}`` with ``b`` zeros like params. With ``decay = 0``,
    ``b = u`` exactly and the update is plain gradient descent's, bit for bit.
    """
    decay = _number(decay)
    if _python(decay) and decay < 0:
        raise ConfigError(f"momentum must be >= 0, got {decay}.")

    def init(params: Params) -> OptState:
        return {"trace": tree_map(torch.zeros_like, params)}

    def update(updates: Updates, state: OptState, params: Params | None = None):
        grads = tree_leaves(updates)
        buf = _add_scaled(grads, _leaves(state["trace"], updates), decay)
        out = _add_scaled(grads, buf, decay) if nesterov else buf
        return tree_unflatten_like(updates, out), {"trace": tree_unflatten_like(updates, buf)}

    return GradientTransformation(init, update)


def scale_by_adam(b1: Number = 0.9, b2: Number = 0.999, eps: Number = 1e-8) -> GradientTransformation:
    """Adam's preconditioning (Kingma & Ba 2015, Algorithm 1), without the learning rate::

        count <- count + 1
        m <- b1 * m + (1 - b1) * u            first moment (computed as lerp(m, u, 1 - b1))
        v <- b2 * v + (1 - b2) * u * u        second moment
        u <- (m / (1 - b1**count)) / (sqrt(v / (1 - b2**count)) + eps)

    The bias corrections ``1 - b**count`` are tensor ops on the count, in float64 when the leaves are
    float64 and in float32 otherwise. ``b1``, ``b2`` and ``eps`` may be 0-d tensors (see :func:`_lerp`
    and :func:`_addcmul`). State: ``{"mu": m, "nu": v, "count": int64 0-d tensor}``.
    """
    if _python(b1, b2) and not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ConfigError(f"adam needs 0 <= b1 < 1 and 0 <= b2 < 1, got b1={b1}, b2={b2}.")
    if _python(eps) and eps < 0:
        raise ConfigError(f"eps must be >= 0, got {eps}.")
    b1, b2, eps = _number(b1), _number(b2), _number(eps)

    def init(params: Params) -> OptState:
        return {
            "mu": tree_map(torch.zeros_like, params),
            "nu": tree_map(torch.zeros_like, params),
            "count": _zero_count(tree_leaves(params)),
        }

    def update(updates: Updates, state: OptState, params: Params | None = None):
        grads = tree_leaves(updates)
        mu = _lerp(_leaves(state["mu"], updates), grads, 1.0 - b1)
        nu = _foreach("mul", _leaves(state["nu"], updates), b2)
        nu = _addcmul(nu, grads, grads, 1.0 - b2)
        count = state["count"] + 1
        t = count.to(_float_dtype(grads))
        bias1 = 1.0 - b1**t
        bias2_sqrt = torch.sqrt(1.0 - b2**t)
        # sqrt(v / c2) computed as sqrt(v) / sqrt(c2), as torch.optim.Adam does, to agree to rounding.
        denom = _add_number(_foreach("div", _foreach("sqrt", nu), bias2_sqrt), eps)
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


def clip_by_global_norm(max_norm: Number) -> GradientTransformation:
    """Rescales updates whose global norm exceeds ``max_norm`` (Pascanu et al. 2013)::

        u <- u * min(1, max_norm / (global_norm(u) + 1e-6))

    the formula of ``torch.nn.utils.clip_grad_norm_``. The factor stays a tensor (never read on the
    host, so no synchronisation); updates already within the bound are multiplied by exactly 1. State ``{}``.
    """
    max_norm = _number(max_norm)
    if _python(max_norm) and max_norm <= 0:
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
        b <- momentum * b + g;  d = b, or d = g + momentum * b with nesterov
        p <- p - lr * d

    Momentum and its Nesterov variant as formulated by Sutskever et al. 2013 and PyTorch's SGD. The
    momentum buffer is kept for ``momentum = 0`` too, where ``d = g`` exactly: the state's structure does
    not depend on the numbers, so runs differing in momentum or weight decay stack and vmap together.
    State: ``({}, {"trace": b}, {"count": ...})``, the states of the chained parts.

    Args:
        momentum: sgd: heavy-ball momentum, within [0, 1] (0: plain gradient descent)
        nesterov: sgd: Nesterov momentum (needs momentum > 0)
        weight_decay: L2 penalty added to the gradient, >= 0
    """
    _check_unit_interval(momentum=momentum)
    if nesterov and _python(momentum) and momentum <= 0:
        raise ConfigError("sgd with nesterov=True needs momentum > 0.")
    return chain(
        add_decayed_weights(weight_decay),
        trace(momentum, nesterov),
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

    Args:
        b1: adam: decay of the first moment, within [0, 1)
        b2: adam: decay of the second moment, within [0, 1)
        eps: adam: added to the second moment's root, > 0
        weight_decay: L2 penalty added to the gradient (enters the moments), >= 0
    """
    _check_unit_interval(b1=b1, b2=b2)
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

    Args:
        b1: adamw: decay of the first moment, within [0, 1)
        b2: adamw: decay of the second moment, within [0, 1)
        eps: adamw: added to the second moment's root, > 0
        weight_decay: adamw: decoupled weight decay, scaled by the learning rate (torch.optim.AdamW's default 0.01)
    """
    _check_unit_interval(b1=b1, b2=b2)
    return chain(
        scale_by_adam(b1, b2, eps),
        add_decayed_weights(weight_decay),
        scale_by_learning_rate(learning_rate),
    )


# ---------------------------------------------------------------------------------------------------
# Hyperparameters in the state
# ---------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    """Whether an option is a number the state holds: a float, an int (not a bool) or a tensor."""
    return isinstance(value, (float, int, Tensor)) and not isinstance(value, bool)


def _as_state_tensor(value: Any, dtype: torch.dtype, device: torch.device | None) -> Tensor:
    """A number (or a sequence of numbers, for a schedule's boundaries) as a tensor for the state."""
    if isinstance(value, Tensor):
        return value.detach().to(dtype=dtype, device=device).clone()
    return torch.tensor(value, dtype=dtype, device=device)


def _bound_options(builder: Callable[..., GradientTransformation], args: tuple, kwargs: dict) -> dict[str, Any]:
    """``{name: value}`` of every option of ``builder`` for this call, defaults included (a ``**kw``
    parameter contributes its entries)."""
    signature = inspect.signature(builder)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    options = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            options.update(value)
        elif kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            raise TypeError(f"inject_hyperparams needs {builder.__name__}'s options by keyword; '{name}' is not.")
        else:
            options[name] = value
    return options


def inject_hyperparams(
    builder: Callable[..., GradientTransformation], static_args: tuple[str, ...] = ()
) -> Callable[..., GradientTransformation]:
    """``builder`` with its numeric options kept in the optimizer state, as optax's ``inject_hyperparams``.

    ``inject_hyperparams(sgd)(0.1, momentum=0.9)`` is an optimizer whose ``init`` puts every number among
    the options (defaults included) in its state as a 0-d tensor, and whose ``update`` rebuilds
    ``builder`` from the state's tensors and applies it::

        state = {"hyperparams": {"learning_rate": 0.1, "momentum": 0.9, "weight_decay": 0.0},  # 0-d tensors
                 "inner": builder(...).init(params)}

    So a state is the whole optimizer's numbers: ``update`` reads none from its closure, and any optimizer
    built by the same call with other numbers can run any such state. States that differ only in numbers
    have the same structure; they stack into one state for ``torch.func.vmap``, and a compiled update does
    not recompile when only the numbers change.

    Which options are numbers (the state's *values*): floats and ints (not bools), and tensors, stored
    in float32, or float64 when a parameter is float64, on the parameters' device. An
    :class:`~fkd.schedules.InjectableSchedule` (what :func:`~fkd.schedules.learning_rate_schedule`
    returns) contributes its numbers as a dict, ``{"learning_rate": {"peak_value": ..., "warmup_steps": ...}}``
    (floats as 0-d tensors, a sequence such as multistep's boundaries as a 1-d tensor), and the schedule is
    rebuilt from them. Everything else is the state's *structure* and stays in the closure: bools
    (``nesterov``), strings, ``None``, lists and tuples, plain schedules, and the names in ``static_args``.

    ``builder`` must build the same state structure whatever its numbers, using tensor-friendly ops
    (:func:`sgd` keeps its momentum buffer at momentum 0), and check ranges only on Python numbers (the
    building blocks do): it is called once here with the Python values, which raises the usual
    :class:`ConfigError`, and then with tensors at each ``update``.
    """

    def build(*args: Any, **kwargs: Any) -> GradientTransformation:
        options = _bound_options(builder, args, kwargs)
        builder(**options)  # checks the Python numbers' ranges now, with their config messages
        numeric = {k: v for k, v in options.items()
                   if k not in static_args and (_is_number(v) or isinstance(v, InjectableSchedule))}
        static = {k: v for k, v in options.items() if k not in numeric}

        def rebuilt(numbers: dict[str, Any]) -> GradientTransformation:
            live = {k: numeric[k].with_numbers(v) if isinstance(numeric[k], InjectableSchedule) else v
                    for k, v in numbers.items()}
            return builder(**static, **live)

        def init(params: Params) -> OptState:
            leaves = tree_leaves(params)
            dtype, device = _float_dtype(leaves), leaves[0].device if leaves else None
            numbers = {k: {n: _as_state_tensor(x, dtype, device) for n, x in v.numbers.items()}
                       if isinstance(v, InjectableSchedule) else _as_state_tensor(v, dtype, device)
                       for k, v in numeric.items()}
            return {"hyperparams": numbers, "inner": rebuilt(numbers).init(params)}

        def update(updates: Updates, state: OptState, params: Params | None = None):
            numbers = state["hyperparams"]
            updates, inner = rebuilt(numbers).update(updates, state["inner"], params)
            return updates, {"hyperparams": numbers, "inner": inner}

        return GradientTransformation(init, update)

    build.__name__ = getattr(builder, "__name__", "injected")
    build.__doc__ = builder.__doc__
    return build


def _is_injected_state(tree: Any) -> bool:
    return isinstance(tree, dict) and tree.keys() == {"hyperparams", "inner"}


def hyperparams(opt_state: OptState) -> dict[str, Any]:
    """The numbers an optimizer state holds: the ``"hyperparams"`` of every :func:`inject_hyperparams`
    state in it (a :func:`chain` of several is searched through), merged into one dict.

    Values are 0-d tensors, or a dict of tensors for a schedule. ``{}`` for a state without injected
    hyperparameters. A name held twice is a ``ValueError`` (read the parts separately then).
    """
    found: dict[str, Any] = {}

    def walk(tree: Any) -> None:
        if _is_injected_state(tree):
            for name, value in tree["hyperparams"].items():
                if name in found:
                    raise ValueError(f"hyperparameter '{name}' is held twice in this optimizer state.")
                found[name] = value
            walk(tree["inner"])
        elif isinstance(tree, (dict, tuple)):
            for member in tree.values() if isinstance(tree, dict) else tree:
                walk(member)

    walk(opt_state)
    return found


def with_hyperparams(opt_state: OptState, **values: Any) -> OptState:
    """``opt_state`` with some of its hyperparameters replaced; the rest of the state is shared, not copied.

    A value is a number or a tensor (cast to the stored tensor's dtype and device), or for a schedule a
    dict of some of its numbers. An unknown name is a ``KeyError``: the state's structure is fixed when
    the optimizer is built, and only its numbers can change. E.g. ``with_hyperparams(s, momentum=0.5,
    learning_rate={"peak_value": 0.2})``.
    """
    missing = set(values) - set(hyperparams(opt_state))
    if missing:
        raise KeyError(f"no hyperparameter {sorted(missing)} in this optimizer state; it holds "
                       f"{sorted(hyperparams(opt_state))}.")

    def replace(old: Any, new: Any) -> Any:
        if isinstance(old, dict):
            unknown = set(new) - set(old)
            if unknown:
                raise KeyError(f"no schedule number {sorted(unknown)}; the schedule holds {sorted(old)}.")
            return {k: replace(v, new[k]) if k in new else v for k, v in old.items()}
        return _as_state_tensor(new, old.dtype, old.device).reshape(old.shape)

    def walk(tree: Any) -> Any:
        if _is_injected_state(tree):
            mine = {k: replace(v, values[k]) if k in values else v for k, v in tree["hyperparams"].items()}
            return {"hyperparams": mine, "inner": walk(tree["inner"])}
        if isinstance(tree, dict):
            return {k: walk(v) for k, v in tree.items()}
        if isinstance(tree, tuple):
            return tuple(walk(v) for v in tree)
        return tree

    return walk(opt_state)


def apply_updates(params: Params, updates: Updates) -> Params:
    """``params + updates``, leaf by leaf, as new tensors; each result keeps its parameter's dtype."""
    p = tree_leaves(params)
    u = [ui if ui.dtype == pi.dtype else ui.to(pi.dtype) for pi, ui in zip(p, _leaves(updates, params))]
    return tree_unflatten_like(params, _foreach("add", p, u))



def ema_update(ema_tree: Any, tree: Any, decay: Number) -> Any:
    r"""The exponential moving average one step on: ``decay * ema + (1 - decay) * tree``, leaf by leaf.

    .. math:: \bar\theta \leftarrow d\,\bar\theta + (1 - d)\,\theta

    New tensors (the inputs are untouched); ``decay`` is a Python number in [0, 1] or a 0-d tensor. Leaves
    that are not floating point (BatchNorm's ``num_batches_tracked``) take ``tree``'s value. The "mean
    teacher" of Tarvainen & Valpola, NeurIPS 2017, eq. 1, is this average of a student's weights.
    """
    e, t = tree_leaves(ema_tree), _leaves(tree, ema_tree)
    floats = [i for i, x in enumerate(e) if x.is_floating_point()]
    mixed = _lerp([e[i] for i in floats], [t[i].to(e[i].dtype) for i in floats], 1.0 - decay) if floats else []
    out = [x if x.is_floating_point() else x.clone() for x in t]
    for i, value in zip(floats, mixed):
        out[i] = value
    return tree_unflatten_like(ema_tree, out)


def optimizer_from_config(
    cfg: OptimizerConfig, steps_per_epoch: int, epochs: int, *, key: str = "train.optimizer"
) -> tuple[GradientTransformation, Schedule]:
    """``(optimizer, schedule)`` for an ``[optimizer]`` table of a run config.

    The optimizer is ``inject_hyperparams(OPTIMIZERS.get(cfg.name))(schedule, **options)``: its numbers, and
    the schedule's, are in its state (:func:`inject_hyperparams`). ``cfg.options`` are checked by
    :func:`~fkd.registry.resolve_options` against the keyword parameters of the optimizer and of the
    schedule, and each gets those it takes; the schedule is :func:`~fkd.schedules.learning_rate_schedule`
    over ``epochs * steps_per_epoch`` steps. A key neither takes, set to anything but another entry's
    default, is a :class:`ConfigError` naming ``<key>.<field>`` (``key`` is ``train.optimizer`` or
    ``teacher.train.optimizer``): momentum does nothing to adam, and a silent no-op would hide the
    mistake. With ``clip_norm > 0``, :func:`clip_by_global_norm` is chained first, whatever the
    optimizer, as ``torch.nn.utils.clip_grad_norm_`` runs before ``optimizer.step()``, with ``max_norm``
    in its state too (clipping or not is structure; the bound is a number).
    """
    fixed = tuple(k for k in attrs.fields_dict(type(cfg)) if k != "options")
    options = resolve_options(cfg.options, [(OPTIMIZERS, cfg.name), (SCHEDULES, cfg.schedule)], prefix=key,
                              fixed=fixed)
    cfg = attrs.evolve(cfg, options=options)
    schedule = learning_rate_schedule(cfg, steps_per_epoch, epochs, key=key)
    entry = OPTIMIZERS.get(cfg.name)
    opt = inject_hyperparams(entry)(schedule, **{k: v for k, v in options.items() if k in options_of(entry)})
    if cfg.clip_norm > 0:
        opt = chain(inject_hyperparams(clip_by_global_norm)(cfg.clip_norm), opt)
    return opt, schedule
