"""What a sweep trains: students as (grid point, seed), and the groups one step can serve.

``--seeds 5`` and ``--grid distill.temperature=1,2,4 --grid distill.alpha=0,0.5`` make the product of
grid points and seeds; each student is a full config (the base config, ``--set``, its grid point and
its seed), validated like any config. Students whose configs differ only in numbers that enter the step
as tensors -- the seed, term weights, ``sweepable`` term fields (temperature, attention p), and the
optimizer's and schedule's numbers (learning rate, momentum, weight decay, betas, eps, warmup, gamma,
the clipping bound: 0-d tensors in each student's optimizer state) -- form one **group** and train
together, stacked, with one (vmapped or looped) step; anything else (architectures, features, batch
size, epochs, optimizer or schedule kind, nesterov, clipping on or off, a term whose weight becomes 0)
splits them into groups that run one after another.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import attrs

from fkd.build import resolve
from fkd.config import Config, apply_overrides, dumps, from_dict, parse_value, read_toml
from fkd.stage_config import refuse_pipeline_keys
from fkd.errors import ConfigError, shorten
from fkd.objective import Objective
from fkd.schema import toml_value


#: The most students one sweep plans (seeds x grid points): each is a config built and checked up front.
MAX_STUDENTS = 4096


def _too_many(n: int, what: str) -> ConfigError:
    return ConfigError(f"{what} makes {shorten(str(n), 24)} students, but a sweep trains at most {MAX_STUDENTS}; "
                       "sweep fewer seeds or grid values, or split it into several sweeps.")


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"5"`` -> seeds 0..4; ``"3,7,11"`` -> those seeds. At most :data:`MAX_STUDENTS`."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--seeds takes a count (--seeds 5) or a list (--seeds 3,7,11), not "
                          f"{shorten(text)!r}.") from None
    if len(values) == 1 and "," not in str(text):
        if values[0] < 1:
            raise ConfigError(f"--seeds needs at least one seed (got {shorten(str(values[0]), 24)}).")
        if values[0] > MAX_STUDENTS:
            raise _too_many(values[0], f"--seeds {shorten(str(values[0]), 24)}")
        return tuple(range(values[0]))
    if len(values) > MAX_STUDENTS:
        raise _too_many(len(values), f"--seeds with {len(values)} seeds")
    if not values or len(set(values)) != len(values):
        raise ConfigError(f"--seeds lists each seed once (got {text!r}).")
    return tuple(values)


def parse_grid(items: list[str]) -> list[tuple[str, list[Any]]]:
    """``["distill.temperature=1,2,4"]`` -> ``[("distill.temperature", [1, 2, 4])]``; values read as TOML."""
    axes = []
    for text in items:
        key, sep, values = text.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid expects KEY=V1,V2,... (got {text!r}), e.g. --grid distill.temperature=1,2,4.")
        if key in (k for k, _ in axes):
            raise ConfigError(f"--grid names {key} twice; give all its values in one --grid.")
        if key == "seed":
            raise ConfigError("--grid cannot sweep 'seed'; use --seeds.")
        parsed = [parse_value(v, f"--grid {shorten(key)}") for v in values.split(",")]
        _check_distinct(key, parsed)
        axes.append((key, parsed))
    return axes


def _check_distinct(key: str, values: list) -> None:
    """Refuse a value listed twice (``2,2`` or ``2,2.0``): its two students would merge under one label."""
    seen: dict[str, Any] = {}
    for v in values:
        if _value_key(v) not in seen:
            seen[_value_key(v)] = v
            continue
        same = seen[_value_key(v)]
        twice = f"{_toml(v)} twice" if _toml(same) == _toml(v) else f"{_toml(same)} and {_toml(v)}, the same value"
        raise ConfigError(f"--grid {shorten(key)} lists {twice}; give each value once (two students would share "
                          "one label).")


def _value_key(value: Any) -> str:
    """Equal for values that make the same config: 2 and 2.0 (a float field takes either), not 1 and true."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value))
    return type(value).__name__ + ":" + _toml(value)


@attrs.frozen
class Student:
    """One student of a sweep: its grid point, seed, full config and objective."""

    index: int
    point: tuple  # ((key, value), ...) in grid order
    seed: int
    config: Config
    objective: Objective

    @property
    def label(self) -> str:
        """``"distill.temperature=4,distill.alpha=0.5/seed=2"`` -- a file-safe, unique name."""
        point = ",".join(f"{k}={v}" for k, v in self.point) or "base"
        return f"{point}/seed={self.seed}".replace("/", "__")


@attrs.frozen
class Group:
    """Students that one step serves: equal configs up to in-step numbers."""

    students: tuple

    @property
    def base(self) -> Student:
        return self.students[0]


@attrs.frozen
class SweepPlan:
    """Every student, grouped; ``axes`` are the grid's keys and values, ``seeds`` the seeds."""

    axes: tuple
    seeds: tuple
    groups: tuple

    @property
    def students(self) -> list[Student]:
        return [s for g in self.groups for s in g.students]

    def describe(self) -> str:
        sizes = [len(g.students) for g in self.groups]
        n = sum(sizes)
        if len(sizes) == 1:
            return f"1 group of {n} students"
        return f"{len(sizes)} groups of {'/'.join(map(str, sizes))} students ({n} in all)"


def plan_sweep(config_path, overrides: list[str], seeds: tuple[int, ...], axes: list[tuple[str, list]],
               **top: Any) -> SweepPlan:
    """Build and validate every student's config and group them (see the module docstring)."""
    count = len(seeds) * math.prod(len(values) for _, values in axes)
    if count > MAX_STUDENTS:
        raise _too_many(count, "--seeds x --grid")
    raw = read_toml(config_path) if config_path is not None else {}
    raw = apply_overrides(raw, list(overrides))
    refuse_pipeline_keys(raw)
    for key, value in top.items():
        if value is not None:
            raw[key] = value
    students = []
    points = list(itertools.product(*[[(k, v) for v in values] for k, values in axes])) or [()]
    for point in points:
        point_raw = apply_overrides(raw, [f"{k}={_toml(v)}" for k, v in point], option="--grid")
        for seed in seeds:
            resolved = resolve(from_dict({**point_raw, "seed": seed}))  # presets expand after the grid's values
            students.append(Student(len(students), tuple(point), seed, resolved.config, resolved.objective))
    labels = [s.label for s in students]
    if len(set(labels)) != len(labels):  # distinct values that print alike would merge in the summary
        label = next(x for x in labels if labels.count(x) > 1)
        raise ConfigError(f"two students of this sweep would both be labelled '{shorten(label)}'; give --grid values "
                          "that print differently.")
    groups: dict[str, list[Student]] = {}
    for s in students:
        groups.setdefault(structure_key(s), []).append(s)
    return SweepPlan(tuple((k, tuple(v)) for k, v in axes), tuple(seeds),
                     tuple(Group(tuple(g)) for g in groups.values()))


def _toml(value: Any) -> str:
    return toml_value(value)


def _placeholder(value: Any) -> Any:
    """A number's place in an optimizer state: any number (and a list of them, as long) becomes 0; bools,
    strings and other options are structure and stay as they are."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 0
    if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [0] * len(value)
    return value


def structure_key(student: Student) -> str:
    """Equal for students one step can serve: the config without its in-step numbers, and the
    objective's structure (:meth:`fkd.objective.Objective.structure`).

    The optimizer's and the schedule's numbers -- learning rate, momentum, weight decay, betas, eps,
    warmup, gamma, milestones (as many), the clipping bound -- are 0-d tensors in each student's optimizer
    state (:func:`fkd.optim.inject_hyperparams`), so they do not split a group; whether clipping is on,
    the optimizer's and the schedule's names and their static options (``nesterov``) do.
    """
    cfg = student.config
    o = cfg.train.optimizer
    opt = attrs.evolve(o, learning_rate=1.0, clip_norm=float(o.clip_norm > 0),
                       options={k: _placeholder(v) for k, v in o.options.items()})
    neutral = attrs.evolve(
        cfg, seed=0, train=attrs.evolve(cfg.train, optimizer=opt),
        distill=attrs.evolve(cfg.distill, preset="terms", terms={"ce": {}}),
    )
    return dumps(neutral) + repr(student.objective.structure())


def hyper_values(student: Student) -> dict:
    """The student's term numbers as Python floats: ``{"terms": {term: {...}}}`` (its optimizer's numbers
    live in its optimizer state, see :mod:`fkd.optim`)."""
    return {"terms": student.objective.hyper_defaults()}


def in_chunks(plan: SweepPlan, chunk: int | None) -> SweepPlan:
    """``plan`` with every group split into runs of at most ``chunk`` students (None: as it is)."""
    if chunk is None:
        return plan
    if chunk < 1:
        raise ConfigError(f"--chunk must be at least 1 (got {chunk}).")
    groups = tuple(Group(g.students[i:i + chunk]) for g in plan.groups for i in range(0, len(g.students), chunk))
    return attrs.evolve(plan, groups=groups)
