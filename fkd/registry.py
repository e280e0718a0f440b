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
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Callable, Iterator

import attrs

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

    def keywords_for(self, name: str, cfg: Any, keys: tuple[str, ...], *, prefix: str) -> dict[str, Any]:
        """``{key: cfg.key}`` for those of ``keys`` that entry ``name`` accepts by keyword.

        ``keys`` are fields of the attrs config ``cfg`` (found at the dotted ``prefix``) that only some
        entries take, e.g. ``momentum`` (sgd) and ``b1`` (adam, adamw). A key the entry does not accept is
        left out when it holds its default, and is a :class:`ConfigError` otherwise: a setting that would
        silently do nothing is a mistake in the config, e.g. ``train.optimizer.momentum = 0.9 has no effect
        on optimizer 'adam', which takes b1, b2, eps, weight_decay; remove the key or pick sgd.``
        """
        entry = self.get(name, key=f"{prefix}.{self.key.rpartition('.')[2]}")
        accepted = accepted_keywords(entry)
        fields = attrs.fields_dict(type(cfg))
        for k in keys:
            value, default = getattr(cfg, k), fields[k].default
            if isinstance(default, attrs.Factory):
                default = default.factory()
            if k in accepted or value == default:
                continue
            takes = sorted(a for a in keys if a in accepted)
            which = f"which takes {', '.join(takes)}" if takes else f"which takes none of {', '.join(keys)}"
            others = [n for n in self.names() if k in accepted_keywords(self._entries[n])]
            fix = f"remove the key or pick {' or '.join(others)}" if others else "remove the key"
            raise ConfigError(f"{prefix}.{k} = {_setting(value)} has no effect on {self.kind} '{name}', {which}; {fix}.")
        return {k: getattr(cfg, k) for k in keys if k in accepted}


def accepted_keywords(fn: Callable) -> tuple[str, ...]:
    """The keyword arguments ``fn`` accepts by name (positional-or-keyword and keyword-only)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds)


def _setting(value: Any) -> str:
    """A config value as it is written in TOML (``true``, ``0.9``, ``[3, 6]``), for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
