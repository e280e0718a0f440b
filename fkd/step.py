"""One pure training step, one eval step, and the train state they thread.

``step = make_train_step(student, objective, optimizer, teacher=teacher_model)`` gives

    step(state, batch, teacher_vars=None) -> (state, metrics)

* ``state`` (a dict pytree, see :func:`init_train_state`) holds the trainable ``params`` (the model's
  weights under ``"model"``, the loss terms' learnable parameters -- FitNets regressors -- under
  ``"objective"``), ``frozen`` weights (a linear probe's backbone), BatchNorm ``buffers``, the loss
  terms' non-learnable ``objective`` state (``{term: state}``, e.g. a memory bank), the optimizer
  state, the run's random ``key``, the ``step`` count and ``bad_step`` (see below). Everything is a
  tensor, so the state can be saved, stacked and vmapped.
* ``batch`` is ``{"x": (B, 3, H, W), "y": (B,), "idx": (B,)}`` (``idx``: each example's index in the
  training set, for terms with per-example memory; optional), optionally with cached teacher outputs
  ``"teacher_logits"`` (B, K) and ``"teacher_features"`` ``{name: tensor}``.
* ``teacher_vars`` is ``{"params": ..., "buffers": ...}`` of the teacher: an input, never updated and
  never part of the student's state.

Inside: the teacher runs in eval mode without gradients, only when a term consumes its outputs (and
when no term reads its logits, only up to its last feature: see :meth:`fkd.models.Model.features_fn`);
the terms get this step's random key ``prng.fold_in(state["key"], state["step"])`` (no global RNG, so
eager, compiled, vmapped and resumed runs draw the same numbers); ``torch.func.grad_and_value``
differentiates the objective w.r.t. the trainable pytree; the optimizer's ``update`` and
``apply_updates`` produce the new params. No ``.backward()``, no ``torch.optim``, no in-place change to
anything the caller passed.

Non-finite losses: a step whose loss or gradients are not finite keeps the previous params, buffers,
objective state and optimizer state (``torch.where``, no host sync) and records its index in
``state["bad_step"]`` (-1 while all is well). The training loop reads it at its sync points and stops
with a message, so weights are never overwritten with NaNs and the loop never syncs per step.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

import torch
from torch.func import grad_and_value

from fkd import prng
from fkd.data_parallel import DataParallel
from fkd.models import Model
from fkd.objective import Objective
from fkd.optim import GradientTransformation, apply_updates, ema_update, global_norm
from fkd.pytree import tree_leaves, tree_map
from fkd.terms import TermInputs

State = dict[str, Any]
Metrics = dict[str, torch.Tensor]

MIX_STREAM = 0x6D6978  # folded into the step's key for the image mixing ("mix")
STRONG_STREAM = 0x737472  # folded into the step's key for the strong view ("str")


def init_train_state(
    params: dict,
    buffers: dict,
    optimizer: GradientTransformation,
    *,
    objective_params: dict | None = None,
    objective_state: dict | None = None,
    frozen: dict | None = None,
    seed: int = 0,
    ema: bool = False,
) -> State:
    """The initial train state (see the module docstring).

    ``params`` are the model's trainable weights, ``frozen`` are used but never updated;
    ``objective_params`` / ``objective_state`` come from :meth:`fkd.objective.Objective.init`; ``seed``
    gives the run's random key (:func:`fkd.prng.key_from_seed`). ``ema`` adds ``state["ema"]``, the
    moving average of the model's weights and buffers that a mean teacher is (``teacher.source = "ema"``),
    starting as a copy of them.
    """
    trainable = {"model": params, "objective": objective_params or {}}
    device = tree_leaves(params)[0].device
    extra = {"ema": {"params": tree_map(torch.clone, {**(frozen or {}), **params}),
                     "buffers": tree_map(torch.clone, buffers)}} if ema else {}
    return {
        **extra,
        "params": trainable,
        "frozen": frozen or {},
        "buffers": buffers,
        "objective": objective_state or {},
        "opt_state": optimizer.init(trainable),
        "key": prng.key_from_seed(seed, device),
        "step": torch.zeros((), dtype=torch.int64, device=device),
        "bad_step": torch.full((), -1, dtype=torch.int64, device=device),
    }


def to_channels_last(tree: Any) -> Any:
    """``tree`` with every 4-D tensor (conv weights, image batches) in ``torch.channels_last`` memory format.

    Values are unchanged, only strides differ; a tensor already in that format is returned as is (no
    copy), so applying this inside a step costs nothing once the caller has converted its state.
    cuDNN's NHWC kernels (and Tensor Cores under bf16) are faster in this layout on recent GPUs.
    """

    def convert(t):
        if isinstance(t, torch.Tensor) and t.ndim == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    return tree_map(convert, tree)


PRECISIONS = ("fp32", "tf32", "bf16")
"""``train.precision``: ``fp32`` (IEEE float32 everywhere), ``tf32`` (float32 tensors, but matmuls and
convolutions on CUDA's TF32 tensor cores: 10-bit mantissa products, float32 accumulation), ``bf16``
(autocast to bfloat16 around the forward passes)."""


def precision_autocast(device_type: str, precision: str):
    """bf16 autocast when ``precision == "bf16"``, else a no-op context: the step's precision policy.

    ``tf32`` needs no autocast (tensors stay float32); it is a process-wide math mode that the loop sets
    around training (:func:`float32_math`)."""
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def float32_math(precision: str, device: torch.device | str = "cpu"):
    """TF32 tensor cores for float32 matmuls and convolutions while inside, when ``precision == "tf32"``
    and ``device`` is CUDA; the previous settings are restored on exit. Elsewhere a no-op.

    Sets ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32`` (PyTorch's
    "TensorFloat-32 (TF32) on Ampere (and later) devices" notes), which the eager kernels read at each call
    and ``torch.compile`` reads when it compiles -- so enter it before the first compiled step runs.
    """
    if precision != "tf32" or torch.device(device).type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def teacher_outputs_fn(
    teacher: Model | None,
    objective: Objective,
    *,
    precision: str,
    device_type: str,
    layout: Callable,
    mixes: bool,
) -> Callable:
    """The step's first part: ``outputs(batch, x, teacher_vars) -> (teacher_logits or None, {name: feature})``.

    Cached outputs in the batch (``teacher_logits``, ``teacher_features``) are used as they are; otherwise
    the teacher runs in eval mode without gradients, only when a term consumes it, and only as far as its
    last feature when no term reads its logits (:meth:`fkd.models.Model.features_fn`; the same cut teacher
    completes a cache that holds the logits only). Outputs are float32 whatever the autocast precision.
    """
    live_features = features_only = None
    if teacher is not None and objective.needs_teacher_features:
        live_features = teacher.features_fn()
        if not objective.needs_teacher_logits:
            features_only = live_features

    def as_float(features: dict) -> dict:
        return {k: v.float() for k, v in features.items()}

    def outputs(batch: dict, x: torch.Tensor, teacher_vars: dict | None):
        if "teacher_logits" in batch:
            if mixes:
                raise ValueError("the step mixes images (function matching), so the teacher must see the mixed "
                                 "view: pass teacher_vars instead of cached teacher outputs")
            if objective.needs_teacher_features and "teacher_features" not in batch:  # a logits-only cache
                if live_features is None or teacher_vars is None:
                    raise ValueError("the cache holds teacher logits only: pass teacher= and teacher_vars for "
                                     "the features")
                with torch.no_grad(), precision_autocast(device_type, precision):
                    features = live_features(layout(teacher_vars["params"]), teacher_vars["buffers"], x)
                return batch["teacher_logits"], as_float(features)
            return batch["teacher_logits"], batch.get("teacher_features", {})
        if not objective.needs_teacher:
            return None, {}
        if teacher is None or teacher_vars is None:
            raise ValueError("the objective needs the teacher: pass teacher= and teacher_vars, or cached outputs")
        with torch.no_grad(), precision_autocast(device_type, precision):
            if features_only is not None:
                return None, as_float(features_only(layout(teacher_vars["params"]), teacher_vars["buffers"], x))
            logits, features, _ = teacher.apply(layout(teacher_vars["params"]), teacher_vars["buffers"], x,
                                                train=False)
        return logits.float(), as_float(features)

    return outputs


class Gradients(NamedTuple):
    """The objective's part of a step: gradients w.r.t. the trainable pytree and what the forward returned.

    ``loss`` and ``metrics`` are 0-d tensors (the batch means); ``correct`` / ``count`` tally the labeled
    examples (label >= 0); ``buffers`` and ``objective`` are the new BatchNorm statistics and loss-term state.
    """

    grads: dict
    loss: torch.Tensor
    metrics: dict
    correct: torch.Tensor
    count: torch.Tensor
    buffers: dict
    objective: dict


def gradients_fn(
    student: Model,
    objective: Callable,
    *,
    train_mode: bool,
    precision: str,
    device_type: str,
    layout: Callable,
) -> Callable[..., Gradients]:
    """The step's second part: ``gradients(state, x, inputs) -> Gradients``.

    ``x`` is the student's input batch; ``inputs`` is the :class:`~fkd.terms.TermInputs` without the
    student's outputs, which the forward pass inside the differentiated function fills in. ``objective`` is
    an :class:`~fkd.objective.Objective` or a wrapper with its call signature (:func:`weighted_by_share`).
    ``torch.func.grad_and_value`` differentiates the objective w.r.t. ``state["params"]`` (the model's weights and the terms' learnable parameters);
    ``state["frozen"]`` weights join the forward without gradients. A sweep member's term numbers
    (weights, temperature) come from ``state["hyper"]["terms"]`` when the state carries them.
    """

    def gradients(state: State, x: torch.Tensor, inputs: TermInputs, x_strong: torch.Tensor | None = None) -> Gradients:
        hyper = state.get("hyper", {}).get("terms")

        def loss_fn(trainable):
            trainable = layout(trainable)
            weights = {**layout(state["frozen"]), **trainable["model"]}
            with precision_autocast(device_type, precision):
                logits, features, new_buffers = student.apply(weights, state["buffers"], x, train=train_mode)
                strong = None
                if x_strong is not None:  # a second forward pass, after the first (BatchNorm sees each view)
                    strong, _, new_buffers = student.apply(weights, new_buffers, x_strong, train=train_mode)
                    strong = strong.float()
            logits = logits.float()
            features = {k: v.float() for k, v in features.items()}
            term_inputs = inputs._replace(student_logits=logits, student_features=features,
                                          student_logits_strong=strong)
            loss, metrics, objective_state = objective(trainable["objective"], state["objective"], term_inputs, hyper)
            return loss, (metrics, new_buffers, logits, objective_state)

        grads, (loss, (metrics, new_buffers, logits, objective_state)) = grad_and_value(loss_fn, has_aux=True)(
            state["params"])
        y = inputs.labels
        hits = (logits.argmax(dim=-1) == y) & (y >= 0)  # labeled examples only; (K, B) for a cohort's K members
        count = (y >= 0).expand_as(hits).sum()
        return Gradients(grads, loss, metrics, hits.sum(), count, new_buffers, objective_state)

    return gradients


def weighted_by_share(objective: Callable, data_parallel: DataParallel) -> Callable:
    """Data parallelism, first wrapper (around the objective): this rank's loss and term metrics times its
    share ``B_r / B`` of the global batch, inside the differentiated function -- so that gradients flowing
    back through synchronised BatchNorm's all-reduce are shares too (see :mod:`fkd.data_parallel`)."""

    def weighted(params, state, inputs: TermInputs, hyper=None):
        loss, metrics, new_state = objective(params, state, inputs, hyper)
        share = data_parallel.share(inputs.labels.shape[0])
        return loss * share, {k: v * share for k, v in metrics.items()}, new_state

    return weighted


def summed_over_ranks(gradients: Callable[..., Gradients], data_parallel: DataParallel) -> Callable[..., Gradients]:
    """Data parallelism, second wrapper (around :func:`gradients_fn`): one all-reduce sums the ranks'
    share-weighted gradients, loss and term metrics and the correct / count tallies, so every rank gets the
    single-process gradient of the global batch."""

    def reduced(state: State, x: torch.Tensor, inputs: TermInputs, x_strong: torch.Tensor | None = None) -> Gradients:
        g = gradients(state, x, inputs, x_strong)
        grads, loss, metrics, correct, count = data_parallel.reduce(g.grads, g.loss, g.metrics, g.correct, g.count)
        return g._replace(grads=grads, loss=loss, metrics=metrics, correct=correct, count=count)

    return reduced


def keep_finite(state: State, new_state: State, finite: torch.Tensor) -> State:
    """The non-finite guard: ``new_state`` where ``finite``, else the previous params, buffers, objective
    and optimizer state (and moving average) (``torch.where``, no host sync); ``bad_step`` records the first bad step's index.

    The training loop reads ``bad_step`` at its sync points and stops with a message (a plain run), or a
    population freezes the member (:func:`fkd.population.freeze_diverged`).
    """
    keep = lambda new, old: torch.where(finite, new, old)  # noqa: E731
    guarded = dict(new_state)
    for part in ("params", "buffers", "objective", "opt_state", "ema"):
        if part in state:
            guarded[part] = tree_map(keep, new_state[part], state[part])
    guarded["bad_step"] = torch.where((state["bad_step"] < 0) & ~finite, state["step"], state["bad_step"])
    return guarded


def make_train_step(
    student: Model,
    objective: Objective,
    optimizer: GradientTransformation,
    *,
    teacher: Model | None = None,
    train_mode: bool = True,
    precision: str = "fp32",
    compile: bool | str = "auto",
    compile_mode: str = "default",
    channels_last: bool = False,
    device: torch.device | str | None = None,
    steps_per_epoch: int | None = None,
    mix: Callable | None = None,
    data_parallel: DataParallel | None = None,
    ema_decay: float | None = None,
    strong_view: Callable | None = None,
) -> Callable[..., tuple[State, Metrics]]:
    """Build ``step(state, batch, teacher_vars=None) -> (state, metrics)`` for one model.

    The step is composed of small pure parts, the way optax chains transforms: the teacher's outputs
    (:func:`teacher_outputs_fn`: cached or live), the objective's gradients (:func:`gradients_fn`, wrapped
    by :func:`summed_over_ranks` under torchrun), the optimizer's ``update`` and ``apply_updates``, and the
    non-finite guard (:func:`keep_finite`). Policies are chosen here, when the step is built, never by
    branches inside it. A population of K models (a sweep's students) wraps this step with
    :mod:`fkd.population` (vmap or a loop, and freeze-on-diverge).

    Args:
        student: the model being trained.
        objective: the loss (:class:`fkd.objective.Objective`).
        optimizer: an ``(init, update)`` pair from :mod:`fkd.optim` (its hyper-parameters live in its state).
        teacher: the teacher's template; required when the objective uses it and the batch carries no
            cached teacher outputs.
        train_mode: run the student in train mode (BatchNorm batch statistics); a linear probe uses False.
        precision: ``"fp32"``, ``"tf32"`` (float32 tensors; the TF32 math mode is the loop's,
            :func:`float32_math`) or ``"bf16"`` (autocast around the forward passes).
        compile: ``"auto"`` wraps the whole step in ``torch.compile`` on CUDA and stays eager elsewhere;
            ``True``/``"on"`` forces it, ``False``/``"off"`` never compiles.
        compile_mode: ``torch.compile``'s ``mode``.
        channels_last: run the convolutions in ``torch.channels_last`` layout: the input batch, the
            student's and teacher's 4-D weights and the terms' 4-D params are converted in the step (see
            :func:`to_channels_last`; convert the initial state and ``teacher_vars`` once with it to
            avoid a copy per step). Values, and so the loss, are unchanged. The config's
            ``train.channels_last`` asks for it on CUDA only.
        device: where the step runs (decides ``compile="auto"`` and autocast's device type).
        steps_per_epoch: optimizer steps per epoch; the terms then see ``inputs.epoch = step /
            steps_per_epoch`` (a 0-d tensor computed in the step, so a warm-up never recompiles). None
            leaves ``epoch`` unset, and a term that consumes it fails with its name.
        mix: ``mix(x, key) -> x`` mixes the batch's images (function matching's mixup / cutmix, see
            :func:`fkd.mixup.make_mixer`) with a key folded from this step's key; the teacher and the
            student both see the mixed images, so the teacher runs live (a batch with cached teacher
            outputs is refused).
        data_parallel: under torchrun, how this rank's slice of the global batch joins the others'
            (:class:`fkd.data_parallel.DataParallel`, applied with :func:`weighted_by_share` and
            :func:`summed_over_ranks`). None in a
            single process.
        ema_decay: a mean teacher (``teacher.source = "ema"``): the teacher's variables are ``state["ema"]``
            (``teacher`` is a template of the student's architecture; ``teacher_vars`` is not used), and after
            the update the average moves on, ``ema <- d * ema + (1 - d) * (new weights, new buffers)``
            (:func:`fkd.optim.ema_update`; Tarvainen & Valpola 2017). The state must come from
            ``init_train_state(..., ema=True)``.
        strong_view: ``strong(x, key) -> x``, the second view of the batch (:func:`fkd.data.strong.make_strong_view`)
            for objectives whose terms read one (MLKD): drawn from this step's key after any mixing; the
            student runs on it after the first view, the teacher live on it (its outputs on the first view may
            still come from the cache). Required exactly when ``objective.needs_strong_view``.

    Metrics (0-d tensors): ``loss``, one entry per loss term, ``correct`` (int64), ``count``,
    ``grad_norm``, ``finite`` (bool). ``correct`` and ``count`` cover the labeled examples only
    (label >= 0; unlabeled transfer-set examples carry -1).
    """
    device_type = torch.device(device).type if device is not None else "cpu"
    layout = to_channels_last if channels_last else (lambda tree: tree)
    teacher_outputs = teacher_outputs_fn(teacher, objective, precision=precision, device_type=device_type,
                                         layout=layout, mixes=mix is not None)
    loss = objective if data_parallel is None else weighted_by_share(objective, data_parallel)
    gradients = gradients_fn(student, loss, train_mode=train_mode, precision=precision, device_type=device_type,
                             layout=layout)
    if data_parallel is not None:
        gradients = summed_over_ranks(gradients, data_parallel)
    mix_images = mix if mix is not None else (lambda x, key: x)
    if objective.needs_strong_view and strong_view is None:
        raise ValueError("a term reads the strong view (student_logits_strong / teacher_logits_strong): pass "
                         "strong_view= (fkd.data.strong.strong_view_for(cfg.data, objective))")
    strong_teacher = teacher if objective.needs_strong_view and objective.needs_teacher else None

    def strong_teacher_logits(x_strong: torch.Tensor, teacher_vars: dict | None) -> torch.Tensor:
        if teacher_vars is None:
            raise ValueError("the strong view needs the teacher live: pass teacher_vars (a cache holds the first view only)")
        with torch.no_grad(), precision_autocast(device_type, precision):
            logits, _, _ = strong_teacher.apply(layout(teacher_vars["params"]), teacher_vars["buffers"], x_strong,
                                                train=False)
        return logits.float()

    def step(state: State, batch: dict, teacher_vars: dict | None = None) -> tuple[State, Metrics]:
        key = prng.fold_in(state["key"], state["step"])
        # the mixing has its own stream, independent of the numbers the terms draw from ``key``
        x = mix_images(layout(batch["x"]), prng.fold_in(key, MIX_STREAM))
        if ema_decay is not None:
            teacher_vars = state["ema"]
        t_logits, t_features = teacher_outputs(batch, x, teacher_vars)
        epoch = state["step"].to(torch.float32) / steps_per_epoch if steps_per_epoch else None
        inputs = TermInputs(None, {}, batch["y"], t_logits, t_features, batch.get("idx"), key, epoch)
        x_strong = None
        if strong_view is not None and objective.needs_strong_view:
            x_strong = strong_view(x, prng.fold_in(key, STRONG_STREAM))
            if strong_teacher is not None:
                inputs = inputs._replace(teacher_logits_strong=strong_teacher_logits(x_strong, teacher_vars))
        g = gradients(state, x, inputs, x_strong)
        updates, opt_state = optimizer.update(g.grads, state["opt_state"], state["params"])
        grad_norm = global_norm(g.grads)
        finite = torch.isfinite(g.loss) & torch.isfinite(grad_norm)
        new_state = {
            **state,
            "params": apply_updates(state["params"], updates),
            "buffers": g.buffers,
            "objective": g.objective,
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        if ema_decay is not None:
            weights = {**state["frozen"], **new_state["params"]["model"]}
            new_state["ema"] = ema_update(state["ema"], {"params": weights, "buffers": g.buffers}, ema_decay)
        metrics = {**g.metrics, "loss": g.loss.detach(), "correct": g.correct, "count": g.count,
                   "grad_norm": grad_norm.detach(), "finite": finite}
        return keep_finite(state, new_state, finite), metrics

    return maybe_compile(step, compile, device_type, compile_mode)


def make_eval_step(
    model: Model,
    *,
    precision: str = "fp32",
    compile: bool | str = "off",
    compile_mode: str = "default",
    device: torch.device | str | None = None,
) -> Callable[..., dict[str, torch.Tensor]]:
    """Build ``eval_step(params, buffers, x, y) -> {"logits": (B, K), "correct": int64 0-d}`` (eval mode)."""
    device_type = torch.device(device).type if device is not None else "cpu"

    def eval_step(params: dict, buffers: dict, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad(), precision_autocast(device_type, precision):
            logits, _, _ = model.apply(params, buffers, x, train=False)
        logits = logits.float()
        return {"logits": logits, "correct": (logits.argmax(dim=-1) == y).sum()}

    return maybe_compile(eval_step, compile, device_type, compile_mode)


def should_compile(compile: bool | str, device_type: str) -> bool:
    """Resolve ``compile`` ("auto" | "on" | "off" | bool) for a device type."""
    if compile in (True, "on"):
        return True
    if compile in (False, "off"):
        return False
    if compile == "auto":
        return device_type == "cuda"
    raise ValueError(f"compile must be 'auto', 'on' or 'off' (got {compile!r})")


def maybe_compile(fn: Callable, compile: bool | str, device_type: str, mode: str = "default") -> Callable:
    """``torch.compile(fn)`` when :func:`should_compile` says so, else ``fn``.

    ``mode="reduce-overhead"`` on CUDA records the compiled step as CUDA graphs (one launch replays the
    whole step: the win for small models at 32 px, whose kernels are shorter than their launches). A graph
    writes each replay's outputs into the same memory, so the returned function marks every call as a new
    step (``torch.compiler.cudagraph_mark_step_begin``): the state it returned last time may then be passed
    back in, as the loop does, and anything kept across steps must be copied
    (:func:`fkd.loop.accumulate` copies the first metrics it sums).
    """
    if not should_compile(compile, device_type):
        return fn
    compiled = torch.compile(fn, mode=None if mode == "default" else mode)
    if mode != "reduce-overhead" or device_type != "cuda":
        return compiled

    def graphed(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    return graphed
