"""The ground floor of configs: field helpers, strict parsing of raw tables into attrs classes, suggestions.

:func:`build_attrs` turns a raw TOML table into an attrs instance, checking every key and value and
naming the dotted key in each :class:`~fkd.errors.ConfigError`. It serves the run config
(:mod:`fkd.config`), the loss terms (:mod:`fkd.terms`) and the presets (:mod:`fkd.presets`) alike.

A class that mixes in :class:`WithOptions` keeps the keys it does not declare as ``options``: those
belong to the component the table chooses (an optimizer, a model, a data set) and are checked against
that component's builder by the build layer (:mod:`fkd.build`), not here. This module imports only the
standard library, attrs and :mod:`fkd.errors`.
"""

from __future__ import annotations

import difflib
import math
import typing
from typing import Any

import attrs

from fkd.errors import ConfigError

# --- field validators ------------------------------------------------------------------------


def one_of(*choices: str):
    def check(inst, attribute, value):
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(repr(c) for c in choices)} (got {value!r})")

    check.choices = choices
    return check


def at_least(lo: float):
    def check(inst, attribute, value):
        if not value >= lo:
            raise ValueError(f"must be >= {lo} (got {value!r})")

    return check


def positive(inst, attribute, value):
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"must be > 0 (got {value!r})")


def unit_interval(inst, attribute, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be within [0, 1] (got {value!r})")


def non_negative(inst, attribute, value):
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"must be >= 0 (got {value!r})")


#: Linux's limits: a file or folder name of at most 255 bytes, a whole path below 4096 bytes.
NAME_MAX, PATH_MAX = 255, 4096


def path_problem(value: str) -> str | None:
    """Why the file system cannot take the path ``value`` (a name over :data:`NAME_MAX` bytes, a path over
    :data:`PATH_MAX`, a NUL character), or None. Caught here, it is one line before anything starts, instead
    of ``OSError: File name too long`` from whatever touches it first -- possibly mid-run."""
    encoded = str(value).encode("utf-8", "surrogateescape")
    if b"\0" in encoded:
        return "contains a NUL character"
    if len(encoded) >= PATH_MAX:
        return f"is {len(encoded)} bytes long, over the file system's limit of {PATH_MAX}"
    longest = max(encoded.replace(b"\\", b"/").split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        return f"has a part of {len(longest)} bytes, over the file system's limit of {NAME_MAX}"
    return None


def file_path(inst, attribute, value):
    problem = path_problem(value)
    if problem is not None:
        shown = value if len(value) <= 60 else value[:59] + "\u2026"
        raise ValueError(f"{problem} (got {shown!r}); shorten the path")


def field(default, *validators, help: str = "", names: str = "", hash: bool | None = None):
    """An attrs field with its ``help`` for ``fkd config --keys``.

    ``names`` says what kind of registered entry the value names (``"optimizer"``, ``"model"``): the
    build layer resolves it and ``--keys`` lists the valid names. The schema itself never imports a
    registry.
    """
    kwargs: dict[str, Any] = {"metadata": {"help": help, "names": names}, "hash": hash}
    if validators:
        kwargs["validator"] = list(validators)
    if isinstance(default, (list, dict)):
        return attrs.field(factory=lambda d=default: type(d)(d), **kwargs)
    if attrs.has(type(default)):
        return attrs.field(factory=lambda d=default: d, **kwargs)
    return attrs.field(default=default, **kwargs)


def validators_of(f: attrs.Attribute) -> list:
    v = f.validator
    if v is None:
        return []
    return list(getattr(v, "_validators", [v]))


# --- options: the keys a chosen component owns -------------------------------------------------


class WithOptions:
    """Mixin for an ``@attrs.frozen(init=False)`` class with an ``options: dict`` field (declared with
    ``hash=False``: a dict has no hash, and equal configs still compare their options).

    ``Cls(name="sgd", momentum=0.9)`` keeps ``name`` as a field and ``momentum`` in ``options``; reading
    ``cfg.momentum`` reads ``cfg.options["momentum"]``. Which options are valid, their types and defaults
    are the keyword parameters of the builder the table chooses (see :mod:`fkd.build`).
    """

    __slots__ = ()

    def __init__(self, **kwargs: Any) -> None:
        fixed = {f.name for f in attrs.fields(type(self))}
        options = dict(kwargs.pop("options", None) or {})
        for key in [k for k in kwargs if k not in fixed]:
            options[key] = kwargs.pop(key)
        self.__attrs_init__(**kwargs, options=options)

    def __getattr__(self, name: str) -> Any:  # only reached when no field has that name
        try:
            return object.__getattribute__(self, "options")[name]
        except (KeyError, AttributeError):
            raise AttributeError(f"{type(self).__name__} has no field or option {name!r}") from None


def has_options(cls: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, WithOptions)


# --- parsing raw tables ------------------------------------------------------------------------


def type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            list: "a list", dict: "a table"}.get(tp, getattr(tp, "__name__", str(tp)))


def convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the type ``tp`` (a nested attrs class is built from its table)."""
    if attrs.has(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table ([{key}]), not {value!r}.")
        return build_attrs(tp, value, key + ".")
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
        or (tp is list and isinstance(value, list))
        or (tp is dict and isinstance(value, dict))
    )
    if not ok:
        raise ConfigError(f"{key} must be {type_name(tp)} (got {value!r}); fix it in the config or --set.")
    return float(value) if tp is float else value


def suggest(name: str, valid: list[str]) -> str:
    """``"did you mean 'x'?"`` for the closest of ``valid``, else the list of valid keys."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'?"
    return f"valid keys: {', '.join(valid)}."


def build_attrs(cls, raw: dict, prefix: str = ""):
    """An attrs instance of ``cls`` from a raw table, every key and value checked (errors name ``prefix + key``).

    For a :class:`WithOptions` class, keys that are not fields are kept as ``options`` unchecked: the
    build layer checks them against the chosen builder.
    """
    fields = {f.name: f for f in attrs.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs, options = {}, {}
    for key, value in raw.items():
        if key == "options" and has_options(cls):
            raise ConfigError(f"'{prefix}options' is not a key: write the options of [{prefix.rstrip('.')}] "
                              "as keys of that table.")
        if key not in fields:
            if has_options(cls):
                options[key] = value
                continue
            raise ConfigError(f"unknown key '{prefix}{key}' in the config; {suggest(key, list(fields))}")
        kwargs[key] = convert(value, hints[key], prefix + key)
    if has_options(cls):
        kwargs["options"] = options
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a field validator
        name = _failing_field(cls, kwargs)
        raise ConfigError(f"{prefix}{name} {exc}.") from None


def _failing_field(cls, kwargs) -> str:
    """Name the field whose validator failed (attrs does not say which)."""
    for f in attrs.fields(cls):
        if f.validator is None:
            continue
        value = kwargs.get(f.name, f.default.factory() if isinstance(f.default, attrs.Factory) else f.default)
        try:
            f.validator(None, f, value)
        except ValueError:
            return f.name
    return "?"


# --- writing values ----------------------------------------------------------------------------


def toml_value(v: Any) -> str:
    """A value as TOML text (``true``, ``0.9``, ``"adam"``, ``[3, 6]``, ``{ce = 1.0}``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
