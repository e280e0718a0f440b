"""What a loss term is: a registered unit with hyper-parameters, declared inputs, ``init`` and ``apply``.

A term is a frozen attrs class whose fields are its hyper-parameters (validated, each with a ``help``
string, so ``fkd config --keys`` lists them), registered under a name with :func:`register_term`
(``fkd/terms/logit.py`` is the smallest complete example).

Like an optax transform, a term is a pair of functions over explicit state:

* ``init(shapes, generator) -> (params, state)``: learnable parameters (trained with the student, e.g.
  FitNets regressors) and non-learnable state (a memory bank of per-example embeddings, running
  statistics). Both are pytrees of tensors (dicts), empty for most terms.
* ``apply(params, state, inputs) -> (loss, new_state)``: pure; ``loss`` is a 0-d tensor, ``new_state``
  has ``state``'s structure. No ``.item()``, no global RNG (randomness comes from ``inputs.key``, see
  :mod:`fkd.prng`), no mutation of ``state``.

The objective (:mod:`fkd.objective`) sums ``weight * loss`` over the configured terms and threads each
term's params and state through the train state; whether the teacher, its logits or its features are
needed follows from what the terms ``consume``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import attrs
import torch
from torch import Tensor

from fkd.errors import ConfigError
from fkd.losses.tokens import MAX_PREFIX_TOKENS, token_count, tokens_match
from fkd.registry import Registry

#: Everything a term may read in a step; a term lists the ones it uses in ``consumes``.
INPUTS = ("labels", "student_logits", "student_features", "teacher_logits", "teacher_features", "idx", "key",
          "epoch", "cohort_logits", "student_logits_strong", "teacher_logits_strong")

#: The registered terms: ``[distill.terms.<name>]`` tables in a config name them.
TERMS = Registry("loss term", "distill.terms", load=("fkd.terms",))


class TermInputs(NamedTuple):
    """What a term sees in one step (B: batch size, K: classes).

    A NamedTuple, which ``torch.compile`` and ``torch.func`` treat as a plain container.
    """

    student_logits: Tensor  # (B, K), fp32, differentiable
    student_features: dict  # {name: (B, C, H, W), (B, D) or (B, N, D) tokens}, differentiable
    labels: Tensor  # (B,) int64
    teacher_logits: Tensor | None  # (B, K), or None when no term consumes them; (B, M, K) for M teachers
    teacher_features: dict  # {name: tensor}, empty when no term consumes them
    idx: Tensor | None  # (B,) int64: each example's index in the training set
    key: Tensor  # 0-d int64 random key of this step (fold_in(run key, step)); see fkd.prng
    epoch: Tensor | None = None  # 0-d float32: epochs completed before this step (step / steps per epoch)
    hyper: dict = {}  # {field: 0-d tensor}: this term's swept hyper-parameters (see Term.hp), else empty
    cohort_logits: Tensor | None = None  # (K, B, C): every cohort member's logits, detached (see fkd.models.cohort)
    # the second, strongly augmented view of the same batch (fkd.data.strong), when a term consumes it:
    student_logits_strong: Tensor | None = None  # (B, K), differentiable
    teacher_logits_strong: Tensor | None = None  # (B, K), the teacher live on the strong view


@attrs.frozen
class Shapes:
    """What ``init`` and ``check`` may size things by.

    Feature shapes exclude the batch dimension: ``(C, H, W)`` for maps, ``(D,)`` for vectors, ``(N, D)``
    for a transformer's token sequence.
    """

    student_features: dict = attrs.field(factory=dict)
    teacher_features: dict = attrs.field(factory=dict)
    num_classes: int = 0
    num_examples: int = 0  # training-set size, for per-example memories indexed by ``inputs.idx``
    #: the teacher's parameters ``{dotted name: tensor}``, read-only: what a term derives constants from at
    #: ``init`` (OFD's margins from a BatchNorm's gamma and beta, SRRL's copy of the classifier head). The
    #: trained teacher's when a run initialises its terms; a randomly initialised one's in the preflight.
    teacher_params: dict = attrs.field(factory=dict, eq=False, repr=False)
    #: the dotted name of the teacher's classifier head (its last ``nn.Linear``, e.g. ``fc``), "" if unknown
    teacher_head: str = ""


@attrs.frozen
class PretrainSettings:
    """A term's pre-phase (:mod:`fkd.pretrain`): ``epochs`` over the training set, SGD with these numbers."""

    epochs: int = 0
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4


# --- hyper-parameter fields ----------------------------------------------------------------------


def hyper(default: Any, *validators, help: str) -> Any:
    """A documented, validated hyper-parameter field (shown by ``fkd config --keys``)."""
    kwargs: dict[str, Any] = {"metadata": {"help": help}}
    if validators:
        kwargs["validator"] = list(validators)
    return attrs.field(default=default, **kwargs)


def positive(inst, attribute, value) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"must be > 0 (got {value!r})")


def non_negative(inst, attribute, value) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"must be >= 0 (got {value!r})")


def internal(default: Any = ()) -> Any:
    """A field set by the objective, not by the config (e.g. the feature pairs)."""
    return attrs.field(default=default, metadata={"config": False})


def config_fields(cls: type) -> list[attrs.Attribute]:
    """The fields a config table may set (every field but :func:`internal` ones)."""
    return [f for f in attrs.fields(cls) if f.metadata.get("config", True)]


# --- the base class and its registration -----------------------------------------------------------


class Term:
    """Base of every loss term; see the module docstring. Subclasses are ``@attrs.frozen`` classes."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for ``fkd config --keys``
    consumes: ClassVar[frozenset] = frozenset()
    #: float fields read through :meth:`hp`, so a sweep can vary them per student inside one step
    sweepable: ClassVar[frozenset] = frozenset()
    #: the field holding the temperature T when the term reads the teacher only through
    #: ``softmax(teacher_logits / T)``: such a term can read an ensemble of teachers (it then gets
    #: :func:`fkd.losses.ensemble_logits` at its T); None: it must name one teacher
    ensemble_temperature: ClassVar[str | None] = None

    def hp(self, inputs: "TermInputs", name: str):
        """Hyper-parameter ``name``: the field's value, or this step's per-student tensor in a sweep.

        ``fkd sweep`` trains students that differ only in numbers inside one (vmapped) step; their values
        arrive as 0-d tensors in ``inputs.hyper``. Read a field through ``hp`` and list it in
        ``sweepable`` to let a sweep vary it without splitting the students into separate groups.
        """
        return inputs.hyper.get(name, getattr(self, name))

    #: the key of this term's *state* that a pre-phase fits on the teacher's features before the student's
    #: first step, then keeps fixed (FT's paraphraser); "" for none. See :mod:`fkd.pretrain`.
    pretrain_part: ClassVar[str] = ""

    def pretrain_settings(self) -> "PretrainSettings":
        """How long and with what SGD the pre-phase fits :attr:`pretrain_part` (0 epochs: no pre-phase)."""
        return PretrainSettings()

    def pretrain_loss(self, part: dict, inputs: "TermInputs") -> Tensor:
        """The pre-phase's 0-d loss of ``part`` (the state's :attr:`pretrain_part`) on one batch; ``inputs``
        carries the teacher's features (and the labels) only."""
        raise NotImplementedError

    def check(self, shapes: Shapes) -> None:
        """Raise :class:`ConfigError` when this term cannot work with these shapes (before training)."""

    def init(self, shapes: Shapes, generator: torch.Generator) -> tuple[dict, dict]:
        """``(params, state)`` for this term; both empty unless it learns or remembers something."""
        return {}, {}

    def apply(self, params: dict, state: dict, inputs: TermInputs) -> tuple[Tensor, dict]:
        """``(loss, new_state)``: the term's 0-d loss on this batch and its state after it."""
        raise NotImplementedError

    def weight_schedule(self) -> dict | None:
        """The ``weight_schedule`` table this term's own keys imply (None: none). The objective applies it
        like one given in the config (:mod:`fkd.terms.weight_schedule`); DKD's ``warmup_epochs`` uses it."""
        return None


def register_term(name: str):
    """Class decorator: register a :class:`Term` subclass under ``name`` (the config's table name).

    Apply it above ``@attrs.frozen``. Checks that the class is an attrs ``Term`` and that ``consumes``
    names only known inputs (:data:`INPUTS`).
    """

    def add(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Term) and attrs.has(cls)):
            raise TypeError(f"register_term('{name}'): {cls!r} must be an @attrs.frozen subclass of fkd.terms.Term")
        unknown = set(cls.consumes) - set(INPUTS)
        if unknown:
            raise TypeError(f"register_term('{name}'): consumes names unknown inputs {sorted(unknown)}; "
                            f"valid: {', '.join(INPUTS)}")
        if "weight" in attrs.fields_dict(cls):
            raise TypeError(f"register_term('{name}'): 'weight' is the objective's key; rename the field")
        cls.name = name
        return TERMS.register(name)(cls)

    return add


# --- the teacher's constants and head -------------------------------------------------------------------


def teacher_param(shapes: Shapes, name: str, term: str, *, what: str = "parameter") -> Tensor:
    """``shapes.teacher_params[name]``, detached; a :class:`ConfigError` listing close names when missing."""
    if name not in shapes.teacher_params:
        import difflib

        close = difflib.get_close_matches(name, list(shapes.teacher_params), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "check the teacher's layer names."
        raise ConfigError(f"the {term} term reads the teacher's {what} '{name}', which the teacher does not have; {hint}")
    return shapes.teacher_params[name].detach()


def teacher_head_params(shapes: Shapes, term: str) -> dict[str, Tensor]:
    """The teacher's classifier head as frozen constants, ``{"weight": (K, D), "bias": (K,)}`` (copies), for a
    term's non-learnable state: applied with :func:`apply_teacher_head` it is the teacher's head as a pure
    function of features -- the same result as ``functional_call`` of the head module -- that needs no
    teacher forward, so it works with cached teacher outputs too."""
    if not shapes.teacher_head:
        raise ConfigError(f"the {term} term applies the teacher's classifier head, but the teacher's head is not "
                          "known here; use a teacher whose classifier is an nn.Linear.")
    prefix = shapes.teacher_head
    weight = teacher_param(shapes, f"{prefix}.weight", term).clone()
    bias = shapes.teacher_params.get(f"{prefix}.bias")
    return {"weight": weight, "bias": bias.detach().clone() if bias is not None else torch.zeros(weight.shape[0])}


def apply_teacher_head(head: dict[str, Tensor], features: Tensor) -> Tensor:
    """The teacher's classifier on ``features`` ``(B, D)``: ``features @ W^T + b``, ``(B, K)``; gradients flow
    into ``features`` only (the head is a constant)."""
    return torch.nn.functional.linear(features, head["weight"].detach(), head["bias"].detach())


# --- feature pairs, shared by the feature terms -------------------------------------------------------


def pair_key(student_name: str, teacher_name: str) -> str:
    """The key of a feature pair in a term's params, e.g. ``"block2->layer1"``."""
    return f"{student_name}->{teacher_name}"


#: What a feature is, by its shape without the batch: ``(D,)`` vector, ``(N, D)`` tokens, ``(C, H, W)`` map.
KINDS = {1: "vector", 2: "token sequence", 3: "map"}

#: What a term that refuses a transformer's tokens tells the user to use instead.
TOKEN_TERMS = ("the feature term (FitNets, a linear regressor over D) or a relation term (rkd, pkt, sp, cc, crd: "
               "on the mean token)")


def check_pair_kinds(term: str, pairs: tuple, shapes: Shapes, *, spatial_only: bool = False,
                     tokens: bool = False) -> None:
    """Each pair must match a ``(C,)`` vector with a vector, or a ``(C, H, W)`` map with a map.

    ``tokens=True`` (a term defined on token sequences, see :mod:`fkd.losses.tokens`): a ``(N, D)`` token
    sequence pairs with tokens or with a map (read as ``H*W`` tokens of width C) when the token counts
    agree up to prefix tokens; otherwise a token sequence is refused, naming the terms that take one.
    """
    if not pairs:
        raise ConfigError(f"the {term} term matches features: set distill.student_features and "
                          "distill.teacher_features (e.g. ['block2'] and ['layer1']).")
    for s, t in pairs:
        s_shape, t_shape = tuple(shapes.student_features[s]), tuple(shapes.teacher_features[t])
        if len(s_shape) not in KINDS or len(t_shape) not in KINDS:
            raise ConfigError(
                f"cannot match student feature '{s}' {s_shape} with teacher feature '{t}' {t_shape}: "
                "features must be (C,) vectors, (N, D) token sequences or (C, H, W) maps."
            )
        kinds = {len(s_shape), len(t_shape)}
        if 2 in kinds and not tokens:
            name, shape = (s, s_shape) if len(s_shape) == 2 else (t, t_shape)
            raise ConfigError(
                f"the {term} term cannot read '{name}' {shape}, a (N, D) token sequence (a transformer's); use "
                f"{TOKEN_TERMS} for it, or pick {'(C, H, W) maps' if spatial_only else 'maps or vectors'}."
            )
        if 2 in kinds and 1 in kinds:
            raise ConfigError(
                f"cannot match student feature '{s}' {s_shape} with teacher feature '{t}' {t_shape}: one is a "
                "token sequence, the other a vector; pick tokens (or a map) on both sides, or a relation term "
                "(rkd, pkt, sp, cc) that reads the mean token."
            )
        if 2 in kinds:
            n_s, n_t = token_count(s_shape), token_count(t_shape)
            if not tokens_match(n_s, n_t):
                raise ConfigError(
                    f"cannot match student feature '{s}' {s_shape} ({n_s} tokens) with teacher feature '{t}' "
                    f"{t_shape} ({n_t} tokens): the counts must agree up to {MAX_PREFIX_TOKENS} prefix "
                    "(class, distillation) tokens; pick a teacher layer whose H*W is the student's patch count, or "
                    "set the ViT's img_size / patch_size so that its grid matches."
                )
            continue
        if len(s_shape) != len(t_shape):
            raise ConfigError(
                f"cannot match student feature '{s}' of shape {s_shape} with teacher feature '{t}' of shape "
                f"{t_shape}: one is a spatial map, the other a vector; pick features of the same kind."
            )
        if spatial_only and len(s_shape) != 3:
            raise ConfigError(
                f"{term} needs spatial maps, but '{s}' and '{t}' are vectors; pick conv features."
            )
