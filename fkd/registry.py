"""Named entries looked up by the name a config gives: loss terms, optimizers, schedules, models, data sets.

A :class:`Registry` is the one list of what a config may name. Config validation, ``fkd config --keys``
and ``--help`` read it; nothing else keeps a copy of the names. Entries register themselves with a
decorator where they are defined::

    SCHEDULES = Registry("schedule", "train.optimizer.schedule")

    @SCHEDULES.register("cosine")
    def cosine(...): ...

An unknown name is a :class:`~fkd.errors.ConfigError` listing the valid ones (and the closest match):
never a silent default. ``load`` imports the modules holding the built-in entries on first use, so a
registry can be consulted (e.g. by config validation) without importing torch-heavy code up front.

An entry's keyword parameters are its **options** (:func:`options_of`): the config keys it owns, with
their defaults, types and help (the ``Args:`` line of its docstring, :func:`option_help`).
:func:`resolve_options` checks a config table's options against the entries it chooses.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
from typing import Any, Callable, Iterator

from fkd.errors import ConfigError


class Registry:
    """``name -> entry`` with a decorator to add entries and a lookup that names the valid ones.

    Args:
        kind: what an entry is, for messages ("loss term", "optimizer").
        key: the config key that names an entry, for messages ("train.optimizer.name").
        load: modules to import before the first lookup; importing them registers the built-ins.
    """

    def __init__(self, kind: str, key: str, *, load: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.key = key
        self._load = load
        self._loaded = not load
        self._entries: dict[str, Any] = {}

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._load:
                importlib.import_module(module)

    def register(self, name: str, entry: Any = None) -> Callable:
        """Add ``entry`` under ``name``; used bare as ``@registry.register("name")``.

        Registering a name twice is an error unless it is the same object (a module imported twice).
        """

        def add(obj: Any) -> Any:
            old = self._entries.get(name)
            if old is not None and old is not obj and _qualname(old) != _qualname(obj):
                raise ConfigError(f"{self.kind} '{name}' is registered twice ({_qualname(old)} and {_qualname(obj)}); "
                                  "rename one of them.")
            self._entries[name] = obj
            return obj

        return add if entry is None else add(entry)

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        self._ensure_loaded()
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str, *, key: str | None = None) -> Any:
        """The entry called ``name``; an unknown name raises :class:`ConfigError` listing the valid ones.

        ``key`` is the dotted config key that gave the name, for the message, when it is not
        ``self.key`` (``teacher.train.optimizer.name`` rather than ``train.optimizer.name``).
        """
        self._ensure_loaded()
        if name not in self._entries:
            raise ConfigError(self.unknown_message(name, key=key))
        return self._entries[name]

    def unknown_message(self, name: str, *, key: str | None = None) -> str:
        """``"<key> = 'x' is not a known <kind>; did you mean ...? valid: ..."`` (one sentence)."""
        valid = self.names()
        close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{key or self.key} = {name!r} is not a known {self.kind}; {hint}valid: {', '.join(valid)}."

    def option_keys(self, *, exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Every option any entry takes (see :func:`options_of`), in registration order."""
        keys: dict[str, None] = {}
        for name in self.names():
            keys.update(dict.fromkeys(options_of(self._entries[name], exclude=exclude)))
        return tuple(keys)


def accepted_keywords(fn: Callable) -> tuple[str, ...]:
    """The keyword arguments ``fn`` accepts by name (positional-or-keyword and keyword-only)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds)


# --- options: a builder's keyword parameters are the config keys it owns ------------------------------


def options_of(entry: Callable, *, exclude: tuple[str, ...] = ()) -> dict[str, inspect.Parameter]:
    """``{key: parameter}`` of the options an entry takes: its keyword-only parameters and those with a
    default. Leading positional parameters without a default are what fkd passes itself (an optimizer's
    ``learning_rate``, a model's ``num_classes`` and ``image_size``, a reader's ``cfg`` and ``view_size``).
    """
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p for p in inspect.signature(entry).parameters.values()
            if p.kind in kinds and p.name not in exclude
            and (p.kind is inspect.Parameter.KEYWORD_ONLY or p.default is not inspect.Parameter.empty)}


def option_default(param: inspect.Parameter) -> Any:
    """A parameter's default as a config value (tuples become TOML lists); ``empty`` when it has none."""
    d = param.default
    return list(d) if isinstance(d, tuple) else d


def option_help(entry: Callable, key: str) -> str:
    """The help of option ``key``: its line in the ``Args:`` section of ``entry``'s docstring
    (``key: text``, continuation lines indented further), or "" when there is none."""
    lines = (inspect.getdoc(entry) or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() in ("Args:", "Arguments:")), None)
    if start is None:
        return ""
    found: list[str] | None = None
    for line in lines[start + 1:]:
        if line and not line.startswith(" "):
            break  # the next section
        text = line.strip()
        if found is not None:
            if line.startswith("        ") and text:
                found.append(text)
                continue
            break
        if text.startswith(f"{key}:") or text.startswith(f"{key} ("):
            found = [text.partition(":")[2].strip()]
    return " ".join(found or [])


def resolve_options(given: dict[str, Any], chosen: list[tuple], *, prefix: str,
                    fixed: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                    strict: bool = True) -> dict[str, Any]:
    """The options of a config table for its ``chosen`` entries, checked and completed with the defaults.

    ``given`` are the table's keys beyond its ``fixed`` ones; ``chosen`` pairs each registry with the
    name the table picks from it (``[(OPTIMIZERS, "sgd"), (SCHEDULES, "cosine")]``), optionally with the
    entry itself when it is found elsewhere (a torchvision model, not registered in ``MODELS``). A key one of the
    chosen entries takes is checked against its parameter's default type (or annotation). A key only
    other entries take is dropped when it holds their default and is a :class:`ConfigError` otherwise:
    a setting that would silently do nothing is a mistake, e.g. ``train.optimizer.momentum = 0.9 has no
    effect on optimizer 'adam', which takes b1, b2, eps, weight_decay; remove the key or pick sgd.``
    With ``strict=False`` such a key is dropped whatever it holds (``[data]`` and the model tables: a
    config written for synthetic data keeps its ``synthetic_size`` when ``--set data.name=...`` picks
    another data set). Any other key is unknown, with the closest valid key suggested.
    """
    entries = [(c[0], c[1], c[2] if len(c) > 2 else c[0].get(c[1], key=f"{prefix}.{c[0].key.rpartition('.')[2]}"))
               for c in chosen]
    takes: dict[str, inspect.Parameter] = {}
    for _, _, entry in entries:
        for k, p in options_of(entry, exclude=exclude).items():
            takes.setdefault(k, p)
    out = {}
    for k, value in given.items():
        if k in takes:
            out[k] = _checked(value, takes[k], entries, f"{prefix}.{k}")
            continue
        for reg, name, entry in entries:
            others = [n for n in reg.names() if k in options_of(reg.get(n), exclude=exclude)]
            if not others:
                continue
            if not strict or all(value == option_default(options_of(reg.get(n), exclude=exclude)[k]) for n in others):
                break  # another entry's default: harmless (a config written for another optimizer)
            keys = reg.option_keys(exclude=exclude)
            accepted = options_of(entry, exclude=exclude)
            mine = sorted(a for a in keys if a in accepted)
            which = f"which takes {', '.join(mine)}" if mine else f"which takes none of {', '.join(keys)}"
            raise ConfigError(f"{prefix}.{k} = {_setting(value)} has no effect on {reg.kind} '{name}', {which}; "
                              f"remove the key or pick {' or '.join(others)}.")
        else:
            # the chosen entries' own keys first: one found outside the registry (a timm model) has its own
            valid = [*fixed, *dict.fromkeys(o for reg, _, entry in entries
                                            for o in (*options_of(entry, exclude=exclude), *reg.option_keys(exclude=exclude)))]
            close = difflib.get_close_matches(k, valid, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}."
            raise ConfigError(f"unknown key '{prefix}.{k}' in the config; {hint}")
    for k, p in takes.items():
        if k not in out:
            if p.default is inspect.Parameter.empty:
                reg, name = next((r, n) for r, n, e in entries if k in options_of(e, exclude=exclude))
                raise ConfigError(f"{prefix}.{k} must be set: {reg.kind} '{name}' needs it.")
            out[k] = option_default(p)
    return out


_TYPES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
          dict: "a table"}


def _checked(value: Any, param: inspect.Parameter, entries: list, key: str) -> Any:
    """``value`` checked against the type of ``param``'s default (or its plain annotation)."""
    tp = _option_type(param, entries)
    if tp is None:
        return value
    ok = ((tp is bool and isinstance(value, bool))
          or (tp is int and isinstance(value, int) and not isinstance(value, bool))
          or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
          or (tp in (str, list, dict) and isinstance(value, tp)))
    if not ok:
        raise ConfigError(f"{key} must be {_TYPES[tp]} (got {_setting(value)}); fix it in the config or --set.")
    return float(value) if tp is float else value


def _option_type(param: inspect.Parameter, entries: list) -> type | None:
    d = param.default
    if d is not inspect.Parameter.empty and d is not None:
        for tp in (bool, int, float, str, dict):
            if type(d) is tp:
                return tp
        return list if isinstance(d, (list, tuple)) else None
    ann = param.annotation
    names = {"bool": bool, "int": int, "float": float, "str": str, "list": list, "dict": dict}
    if isinstance(ann, str):
        return names.get(ann)
    return ann if ann in names.values() else None


def _setting(value: Any) -> str:
    """A config value as it is written in TOML (``true``, ``0.9``, ``[3, 6]``), for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


@contextlib.contextmanager
def naming_options(prefix: str, names) -> Iterator[None]:
    """Inside, a builder's :class:`ConfigError` about one of its options (``"momentum must be within [0, 1]
    ..."``) is raised again naming the config key (``"train.optimizer.momentum must be ..."``)."""
    try:
        yield
    except ConfigError as exc:
        message = str(exc)
        if any(message.startswith(f"{name} ") for name in names):
            raise ConfigError(f"{prefix}.{message}") from None
        raise
