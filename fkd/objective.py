"""The distillation objective: ``loss = sum_k w_k * term_k``, over registered loss terms with their own state.

An :class:`Objective` combines terms (:mod:`fkd.terms`) the way optax's ``chain`` combines transforms:
``init`` gathers each term's ``(params, state)`` under its name, and a call applies every term to the
same inputs and returns the weighted loss, one metric per term and every term's new state. Weights are
Python floats fixed when the objective is built; a zero-weight term is dropped, so it is never computed
and nothing branches on tensor values.

Where an objective comes from (:func:`from_config`): one ``[distill.terms.<name>]`` table per term,
with ``weight`` (default 1) and that term's own keys. The presets (``distill.method = "logit"``, ...)
are expanded to such tables when the config is read (:mod:`fkd.presets`).

Feature terms match ``distill.student_features[i]`` with ``distill.teacher_features[i]``, unless a term's
table gives its own lists (``student_features = [...]``, ``teacher_features = [...]``, paired by position):
those override the shared ones for that term alone, and the models return the union of every term's
features. A table's ``weight_schedule`` (:mod:`fkd.terms.weight_schedule`) makes the term's weight a
function of the fractional epoch, applied here with the weights.
"""

from __future__ import annotations

import math

import attrs
import torch

from fkd import losses, prng
from fkd.errors import ConfigError, shorten
from fkd.models.ensemble import SEP as TEACHER_SEP  # "<teacher>:<feature>"
from fkd.pytree import tree_to
from fkd.schema import build_attrs
from fkd.terms import TERMS, Shapes, Term, TermInputs, config_fields
from fkd.terms import weight_schedule as weight_schedules




@attrs.frozen
class WeightedTerm:
    """One term of an objective: its name (the metric and the key of its params/state), weight, unit, with
    several teachers the one it reads (``teacher``; ``""``: their ensemble), and the schedule its weight
    follows over the epochs (None: constant)."""

    name: str
    weight: float
    term: Term
    teacher: str = ""
    schedule: weight_schedules.WeightSchedule | None = None

    def weight_at(self, weight, epoch):
        """``weight`` (the configured float or a sweep's 0-d tensor) times the schedule's factor at ``epoch``."""
        return weight if self.schedule is None else weight * self.schedule(epoch)


@attrs.frozen
class Objective:
    """``objective(params, state, inputs) -> (loss, metrics, new_state)``; see the module docstring."""

    terms: tuple = ()
    #: several teachers (``[teachers.<name>]``): their names in the order of the teacher-logits axis, their
    #: weights and how a term that reads the ensemble mixes them (``"weighted"`` | ``"confidence"``)
    teachers: tuple = ()
    teacher_weights: tuple = ()
    ensemble: str = "weighted"

    @property
    def weights(self) -> dict[str, float]:
        """``{term name: weight}`` in the objective's order."""
        return {t.name: t.weight for t in self.terms}

    def _consumed(self, what: str) -> bool:
        return any(what in t.term.consumes for t in self.terms)

    @property
    def needs_teacher_logits(self) -> bool:
        return self._consumed("teacher_logits")

    @property
    def needs_teacher_features(self) -> bool:
        return self._consumed("teacher_features")

    @property
    def needs_strong_view(self) -> bool:
        """Whether a term reads the second, strongly augmented view (:mod:`fkd.data.strong`): the step then
        runs the student, and the teacher live, on it too."""
        return self._consumed("student_logits_strong") or self._consumed("teacher_logits_strong")

    @property
    def needs_teacher(self) -> bool:
        return self.needs_teacher_logits or self.needs_teacher_features or self._consumed("teacher_logits_strong")

    @property
    def needs_features(self) -> bool:
        """Whether any term reads features (the models must return them, the pairs must match)."""
        return self._consumed("student_features") or self.needs_teacher_features or bool(self._student_outputs())

    def _student_outputs(self) -> tuple[str, ...]:
        # student outputs a term reads without a pair: a distilled DeiT's second head (fkd.terms.heads)
        return tuple(n for t in self.terms for n in getattr(t.term, "student_outputs", ()))

    def _feature_names(self, side: int) -> tuple[str, ...]:
        names = [pair[side] for t in self.terms for pair in getattr(t.term, "pairs", ())]
        return tuple(dict.fromkeys(names))

    @property
    def student_feature_names(self) -> tuple[str, ...]:
        """The student features the terms read, in first-use order (pairs, then heads such as ``head_dist``)."""
        paired = self._feature_names(0) if self._consumed("student_features") else ()
        return tuple(dict.fromkeys((*paired, *self._student_outputs())))

    @property
    def teacher_feature_names(self) -> tuple[str, ...]:
        """The teacher features the terms read, in first-use order."""
        return self._feature_names(1) if self.needs_teacher_features else ()

    def check(self, shapes: Shapes) -> None:
        """Every term's :meth:`~fkd.terms.Term.check` (unmatchable feature pairs fail here, before training)."""
        for t in self.terms:
            t.term.check(shapes)

    def probe(self, shapes: Shapes, batch_size: int = 4) -> None:
        """Apply every term once to a random batch of the real shapes (on the CPU, without gradients) and
        check what it returns: ``(loss, new_state)`` with a 0-d floating-point ``loss``.

        Run once when a run is built, never in the step: a term that returns a per-example loss, an integer
        or no state fails here with a :class:`ConfigError` naming it, instead of inside ``grad`` mid-run.
        An exception from a user's term becomes such an error too; fkd's own terms keep their traceback.
        """
        g = torch.Generator().manual_seed(0)
        b, k = max(2, min(batch_size, 8)), max(shapes.num_classes, 2)
        rand = lambda shape: torch.randn((b, *shape), generator=g)  # noqa: E731
        inputs = TermInputs(
            student_logits=rand((k,)), student_features={n: rand(s) for n, s in shapes.student_features.items()},
            labels=torch.randint(k, (b,), generator=g), teacher_logits=rand((k,)),
            teacher_features={n: rand(s) for n, s in shapes.teacher_features.items()},
            idx=torch.arange(b) % max(shapes.num_examples, 1), key=prng.key_from_seed(0), epoch=torch.zeros(()),
            cohort_logits=torch.randn((2, b, k), generator=g), student_logits_strong=rand((k,)),
            teacher_logits_strong=rand((k,)))
        params, state = self.init(shapes)
        for t in self.terms:
            try:
                with torch.no_grad():
                    out = t.term.apply(params.get(t.name, {}), state.get(t.name, {}), inputs)
            except Exception as exc:
                if type(t.term).__module__.startswith("fkd."):
                    raise  # a bug of fkd's: shown with its traceback
                reason = (str(exc).strip().splitlines() or [""])[0]
                raise ConfigError(f"the '{t.name}' loss term failed on a test batch of {b} before training: "
                                  f"{type(exc).__name__}: {shorten(reason, 200)}; fix its apply().") from None
            loss = out[0] if isinstance(out, tuple) and len(out) == 2 else None
            if not (isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.is_floating_point()):
                raise ConfigError(f"the '{t.name}' loss term must return (loss, new_state) with a 0-d floating-point "
                                  f"loss, but on a test batch of {b} it returned {_described(out)}; reduce the loss "
                                  "over the batch (e.g. .mean()) and return it with the state.")

    def init(self, shapes: Shapes, *, seed: int = 0, device="cpu") -> tuple[dict, dict]:
        """``({name: params}, {name: state})`` of every term.

        Each term draws from its own CPU generator seeded with ``seed``, so its values do not depend on
        the other terms or the device.
        """
        self.check(shapes)
        params, state = {}, {}
        for t in self.terms:
            p, s = t.term.init(shapes, torch.Generator().manual_seed(seed))
            params[t.name], state[t.name] = tree_to(p, device), tree_to(s, device)
        return params, state

    def __call__(self, params: dict, state: dict, inputs: TermInputs,
                 hyper: dict | None = None) -> tuple[torch.Tensor, dict, dict]:
        """Weighted loss, per-term metrics (detached 0-d tensors, never synced) and each term's new state.

        ``hyper`` (a sweep's per-student values, see :meth:`hyper_defaults`): ``{term: {"weight": w,
        field: value}}`` of 0-d tensors replacing the term's weight and its ``sweepable`` fields.
        """
        _check_inputs(self, inputs)
        hyper = hyper or {}
        values, weights, new_state = {}, {}, {}
        for t in self.terms:
            mine = hyper.get(t.name, {})
            fields = {k: v for k, v in mine.items() if k != "weight"}
            term_inputs = inputs._replace(hyper=fields) if fields else inputs
            if self.teachers and t.term.consumes & {"teacher_logits"}:
                term_inputs = term_inputs._replace(teacher_logits=self._teacher_logits(t, term_inputs))
            values[t.name], term_state = t.term.apply(params.get(t.name, {}), state.get(t.name, {}), term_inputs)
            weights[t.name] = t.weight_at(mine.get("weight", t.weight), inputs.epoch)
            if term_state or t.name in state:  # the same structure as ``state`` (stateless terms may be absent)
                new_state[t.name] = term_state
        loss, metrics = losses.weighted_sum(values, weights)
        return loss, metrics, new_state

    def _teacher_logits(self, t: WeightedTerm, inputs: TermInputs) -> torch.Tensor:
        """The ``(B, K)`` teacher logits term ``t`` sees, from the ensemble's ``(B, M, K)``: its named
        teacher's, or logits whose softmax at the term's temperature is the ensemble's distribution
        (:func:`fkd.losses.ensemble_logits`; per-example confidence weights with ``ensemble = "confidence"``)."""
        stacked = inputs.teacher_logits
        if t.teacher:
            return stacked[:, self.teachers.index(t.teacher)]
        per_teacher = stacked.movedim(1, 0)  # (M, B, K)
        if self.ensemble == "confidence":
            weights = losses.confidence_weights(per_teacher, inputs.labels)
        else:
            weights = torch.tensor(self.teacher_weights, dtype=per_teacher.dtype, device=per_teacher.device)
        temperature = t.term.hp(inputs, t.term.ensemble_temperature) if t.term.ensemble_temperature else 1.0
        return losses.ensemble_logits(per_teacher, temperature, weights)

    def hyper_defaults(self) -> dict[str, dict[str, float]]:
        """``{term: {"weight": w, field: value}}``: the numbers a sweep may vary inside one step."""
        return {t.name: {"weight": t.weight, **{f: float(getattr(t.term, f)) for f in sorted(t.term.sweepable)}}
                for t in self.terms}

    def structure(self) -> "Objective":
        """This objective with its weights and sweepable fields zeroed: equal for objectives that one
        sweep step can serve (the same terms, pairs and non-sweepable settings)."""
        with attrs.validators.disabled():  # a placeholder value, not a setting: no field's range applies
            return attrs.evolve(self, terms=tuple(
                WeightedTerm(t.name, 0.0, attrs.evolve(t.term, **{f: 1.0 for f in t.term.sweepable}), t.teacher,
                             t.schedule)
                for t in self.terms))


class CohortObjective:
    """One objective per cohort member, summed: ``objective(params, state, inputs)`` as :class:`Objective`,
    over a :class:`~fkd.models.cohort.Cohort`'s outputs (logits ``(K, B, C)``, features
    ``"<member>:<feature>"``).

    Member k's terms see its own logits and features, the whole cohort's logits detached
    (``inputs.cohort_logits``, for the ``mutual`` term) and a key folded with k. The loss is the sum of the
    members' losses -- each member's gradient is then its own loss's -- and each term's metric the
    members' mean. Term params and state are ``{member: ...}``; everything else is the base objective's.
    """

    def __init__(self, base: Objective, names: tuple):
        self.base, self.names = base, tuple(names)

    def __getattr__(self, name):  # weights, needs_teacher, feature names, hyper_defaults, ...
        return getattr(self.base, name)

    def structure(self) -> "CohortObjective":
        return CohortObjective(self.base.structure(), self.names)

    def __eq__(self, other) -> bool:
        return isinstance(other, CohortObjective) and (self.base, self.names) == (other.base, other.names)

    def __hash__(self) -> int:
        return hash((self.base, self.names))

    def _member_shapes(self, shapes: Shapes, name: str) -> Shapes:
        mine = {k.partition(TEACHER_SEP)[2]: v for k, v in shapes.student_features.items()
                if k.startswith(name + TEACHER_SEP)}
        return attrs.evolve(shapes, student_features=mine)

    def check(self, shapes: Shapes) -> None:
        for name in self.names:
            self.base.check(self._member_shapes(shapes, name))

    def probe(self, shapes: Shapes, batch_size: int = 4) -> None:
        for name in self.names:
            self.base.probe(self._member_shapes(shapes, name), batch_size)

    def init(self, shapes: Shapes, *, seed: int = 0, device="cpu") -> tuple[dict, dict]:
        params, state = {}, {}
        for k, name in enumerate(self.names):
            params[name], state[name] = self.base.init(self._member_shapes(shapes, name), seed=seed + k, device=device)
        return params, state

    def __call__(self, params: dict, state: dict, inputs: TermInputs, hyper: dict | None = None):
        cohort = inputs.student_logits.detach()
        total, metrics, new_state = 0.0, {}, {}
        for k, name in enumerate(self.names):
            prefix = name + TEACHER_SEP
            strong = inputs.student_logits_strong
            mine = inputs._replace(
                student_logits=inputs.student_logits[k], cohort_logits=cohort, key=prng.fold_in(inputs.key, k),
                student_logits_strong=strong[k] if strong is not None else None,
                student_features={f[len(prefix):]: v for f, v in inputs.student_features.items() if f.startswith(prefix)})
            loss, member_metrics, new_state[name] = self.base(params.get(name, {}), state.get(name, {}), mine, hyper)
            total = total + loss
            for term, value in member_metrics.items():
                metrics[term] = metrics.get(term, 0.0) + value / len(self.names)
        return total, metrics, new_state


def over_cohort(objective: Objective, names: tuple) -> Objective | CohortObjective:
    """``objective`` for each member of a cohort named ``names`` (:class:`CohortObjective`), or itself
    when there is no cohort. A ``mutual`` term needs one, and a cohort of one member is refused."""
    mutual = [t.name for t in objective.terms if "cohort_logits" in t.term.consumes]
    if not names:
        if mutual:
            raise ConfigError(f"the {mutual[0]} term makes students teach each other: train a cohort with "
                              "[cohort] size = 2 (or more), or drop the term.")
        return objective
    if len(names) < 2:
        raise ConfigError(f"a cohort needs two or more members (got {len(names)}); set cohort.size = 2 or more.")
    return CohortObjective(objective, names)


def _described(out) -> str:
    """What a term returned, in a few words: ``a tensor of shape (4,) and dtype float32 and its state``."""
    def one(x) -> str:
        if isinstance(x, torch.Tensor):
            return f"a tensor of shape {tuple(x.shape)} and dtype {str(x.dtype).removeprefix('torch.')}"
        return f"a {type(x).__name__}"

    if isinstance(out, tuple) and len(out) == 2:
        return one(out[0]) + " and its state"
    return one(out) if not isinstance(out, tuple) else f"a tuple of {len(out)}"


def _check_inputs(objective: Objective, inputs: TermInputs) -> None:
    """A term whose input is missing fails with its name, not deep inside its formula (Python checks only)."""
    for t in objective.terms:
        if t.schedule is not None and inputs.epoch is None:
            raise ValueError(f"the '{t.name}' term's weight follows a schedule over the epochs, but no epoch was "
                             "given (make_train_step passes it when built with steps_per_epoch)")
        for what in ("teacher_logits", "idx", "epoch", "student_logits_strong", "teacher_logits_strong"):
            if what in t.term.consumes and getattr(inputs, what) is None:
                raise ValueError(f"the '{t.name}' term consumes {what}, but none was given (the step passes "
                                 "batch['idx'], the epoch and the teacher's outputs when a term consumes them)")


# --- building objectives ----------------------------------------------------------------------------


def build(tables: dict[str, dict], *, pairs: tuple = (), where: str = "distill.terms",
          teachers: dict[str, float] | None = None, ensemble: str = "weighted") -> Objective:
    """An objective from ``{term name: {"weight": w, **hyper-parameters}}``.

    Names are looked up in :data:`fkd.terms.TERMS`; unknown names, unknown keys and invalid values are
    :class:`ConfigError` naming the dotted key (``where.<name>.<key>``) and the valid choices. Terms
    that match features get ``pairs``.

    ``teachers`` (``{name: weight}``, two or more) makes it an objective over an ensemble: a table's
    ``teacher`` key names the one teacher that term reads (its feature pairs then read that teacher's
    features, ``"<teacher>:<feature>"``); without it a term reads the ensemble, which only terms that see
    the teacher through ``softmax(z / T)`` can (:attr:`fkd.terms.Term.ensemble_temperature`).
    """
    teachers = teachers or {}
    if not isinstance(tables, dict):
        raise ConfigError(f"{where} must be a table of term tables, e.g. [{where}.ce] weight = 1.0.")
    terms = []
    for name, table in tables.items():
        if name not in TERMS:
            raise ConfigError(f"unknown loss term '{name}' in {where}; valid terms: {', '.join(TERMS.names())}.")
        cls = TERMS.get(name)
        if not isinstance(table, dict):
            raise ConfigError(f"{where}.{name} must be a table ([{where}.{name}] with weight and the term's keys).")
        keys = dict(table)
        weight = keys.pop("weight", 1.0)
        schedule_table = keys.pop("weight_schedule", None)
        paired = "pairs" in attrs.fields_dict(cls)
        own = {side: keys.pop(side) for side in ("student_features", "teacher_features") if paired and side in keys}
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise ConfigError(f"{where}.{name}.weight must be a number >= 0 and finite (got {weight!r}).")
        if teachers and "teacher_logits_strong" in cls.consumes:
            raise ConfigError(f"the {name} term reads the teacher on a second, strongly augmented view, which fkd "
                              "runs for one teacher only; use a single [teacher] table, or drop the term.")
        reads_teacher = bool({"teacher_logits", "teacher_features"} & cls.consumes)
        teacher = _term_teacher(cls, keys.pop("teacher", "") if reads_teacher else "", teachers, f"{where}.{name}")
        valid = [f.name for f in config_fields(cls)]
        for key in keys:
            if key not in valid:
                fixed = ["weight", "weight_schedule", *(["teacher"] if reads_teacher else []),
                         *(["student_features", "teacher_features"] if paired else [])]
                raise ConfigError(f"unknown key '{key}' in {where}.{name}; valid keys: {', '.join([*fixed, *valid])}.")
        term = build_attrs(cls, keys, f"{where}.{name}.")
        if paired:
            mine = _own_pairs(own, f"{where}.{name}") if own else pairs
            term = attrs.evolve(term, pairs=tuple((s, f"{teacher}{TEACHER_SEP}{t}" if teacher else t) for s, t in mine))
        schedule = _schedule(term, schedule_table, f"{where}.{name}")
        if weight != 0:
            terms.append(WeightedTerm(name, float(weight), term, teacher, schedule))
    if not terms:
        raise ConfigError(f"every term in {where} has weight 0; give at least one term a positive weight.")
    return Objective(tuple(terms), tuple(teachers), tuple(float(w) for w in teachers.values()), ensemble)


def _own_pairs(own: dict, where: str) -> tuple[tuple[str, str], ...]:
    """A term table's own ``student_features`` / ``teacher_features``, checked and paired by position."""
    if len(own) != 2:
        given, missing = next(iter(own)), ({"student_features", "teacher_features"} - set(own)).pop()
        raise ConfigError(f"{where}.{given} is given without {where}.{missing}; give both lists (paired by position).")
    for side, names in own.items():
        if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
            raise ConfigError(f"{where}.{side} must be a non-empty list of feature names, e.g. ['block2', 'block3'] "
                              f"(got {names!r}).")
    s, t = own["student_features"], own["teacher_features"]
    if len(s) != len(t):
        raise ConfigError(f"{where}.student_features has {len(s)} names but {where}.teacher_features has {len(t)}; "
                          "they are paired by position, so give the same number.")
    return tuple(zip(s, t))


def _schedule(term: Term, table, where: str) -> weight_schedules.WeightSchedule | None:
    """The term's weight schedule: its table's ``weight_schedule``, or the one its own keys imply (DKD's
    ``warmup_epochs``); both at once is refused."""
    implied = term.weight_schedule()
    if table is not None and implied is not None:
        raise ConfigError(f"{where} gives weight_schedule and a key that implies one ({implied}); keep one of them.")
    if table is None and implied is None:
        return None
    return weight_schedules.parse(table if table is not None else implied, f"{where}.weight_schedule")


def _term_teacher(cls: type, teacher, teachers: dict, where: str) -> str:
    """The teacher a term's table names (``""``: the ensemble, or the one teacher), checked."""
    if not isinstance(teacher, str):
        raise ConfigError(f"{where}.teacher must be a teacher's name (got {teacher!r}).")
    if teacher and not teachers:
        raise ConfigError(f"{where}.teacher = {teacher!r} names a teacher, but the config has one [teacher]; "
                          "give several as [teachers.<name>] tables, or drop the key.")
    if teacher and teacher not in teachers:
        raise ConfigError(f"{where}.teacher = {teacher!r} is not one of the teachers: {', '.join(teachers)}.")
    if teachers and not teacher:
        if "teacher_features" in cls.consumes:
            raise ConfigError(f"the {cls.name} term reads teacher features, which an ensemble does not have; name "
                              f"one teacher: {where}.teacher = {next(iter(teachers))!r}.")
        if "teacher_logits" in cls.consumes and not cls.ensemble_temperature:
            raise ConfigError(f"the {cls.name} term cannot read an ensemble of teachers (it does not see the teacher "
                              f"through softmax(z / T)); name one teacher: {where}.teacher = {next(iter(teachers))!r}.")
    return teacher


def from_weights(weights: dict[str, float], *, pairs: tuple = (), **hyper) -> Objective:
    """An objective from ``{term: weight}``, each term taking the ``hyper`` keys it has.

    ``from_weights({"ce": 0.3, "logit": 0.7}, temperature=4.0)``; ``from_weights({"ce": 0.7,
    "feature": 0.3}, pairs=(("block2", "layer1"),))``. A ``hyper`` key no term takes is an error.
    """
    tables, used = {}, set()
    for name, w in weights.items():
        names = {f.name for f in config_fields(TERMS.get(name))} if name in TERMS else set()
        mine = {k: v for k, v in hyper.items() if k in names}
        used |= set(mine)
        tables[name] = {"weight": w, **mine}
    unused = sorted(set(hyper) - used)
    if unused:
        raise ConfigError(f"no term of {sorted(weights)} takes {', '.join(unused)}.")
    return build(tables, pairs=pairs, where="weights")


def term_tables(distill) -> dict[str, dict]:
    """The ``{term: {"weight", ...}}`` tables of a :class:`fkd.config.DistillConfig` (presets are expanded
    when it is built, so these are its ``terms``)."""
    return distill.terms


def from_config(distill, teachers: dict | None = None) -> Objective:
    """Build the objective a :class:`fkd.config.DistillConfig` describes (imports its user terms first),
    over the ensemble of ``teachers`` (``{name: TeacherConfig}``, the config's ``[teachers.<name>]``) when given.

    Commands build it once per run, through :func:`fkd.build.load`."""
    from fkd.user_imports import import_user_files

    import_user_files(list(distill.imports))
    if len(distill.student_features) != len(distill.teacher_features):
        raise ConfigError(
            f"distill.student_features has {len(distill.student_features)} names but distill.teacher_features "
            f"has {len(distill.teacher_features)}; they are paired by position, so give the same number."
        )
    pairs = tuple(zip(distill.student_features, distill.teacher_features))
    where = "distill.weights" if distill.preset == "combined" else "distill.terms"
    objective = build(term_tables(distill), pairs=pairs, where=where,
                      teachers={name: t.weight for name, t in (teachers or {}).items()}, ensemble=distill.ensemble)
    paired = [t.name for t in objective.terms if "pairs" in attrs.fields_dict(type(t.term)) and not t.term.pairs]
    if paired:
        raise ConfigError(
            f"the {', '.join(paired)} term{'s' if len(paired) > 1 else ''} of distill.method = "
            f"'{distill.preset}' match{'' if len(paired) > 1 else 'es'} features: set distill.student_features "
            "and distill.teacher_features (e.g. ['block2'] and ['layer1']), or the term's own student_features and "
            "teacher_features."
        )
    return objective
