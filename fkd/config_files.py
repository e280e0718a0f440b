"""Config files on disk: read one TOML file and resolve its ``extends`` chain into one plain dict.

A config may start from others: ``extends = "_base.toml"`` (or a list, ``extends = ["a.toml", "b.toml"]``),
each path relative to the file that names it. The bases are merged in order, then the file's own keys on top;
tables merge deeply and the later value wins, while any other value (a list included) is replaced whole.
The result never holds ``extends``, so what a run writes to its folder is self-contained.

This module sits on the ground floor: it knows TOML and files, not what a config means (that is
:mod:`fkd.config`), and imports nothing of fkd but :mod:`fkd.errors`.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from fkd.errors import ConfigError

EXTENDS = "extends"

#: How deep tables and arrays may sit within each other (fkd's own configs need 5: a list in distill.terms.<name>).
#: Deeper ones are refused in one line before anything walks them (each walk is recursive).
MAX_DEPTH = 16


def nesting_depth(value, limit: int = MAX_DEPTH) -> int:
    """How many tables and arrays ``value`` nests (0 for a number or string), counted without recursion and
    only up to ``limit + 1``."""
    depth, level = 0, [value]
    while True:
        containers = [v for v in level if isinstance(v, (dict, list))]
        if not containers or depth > limit:
            return depth
        depth += 1
        level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]


def parse_toml(text: str, where: str) -> dict:
    """The TOML document ``text``; :class:`ConfigError` naming ``where`` when it nests tables or arrays more
    than :data:`MAX_DEPTH` deep (tomllib's parser recurses, and so do fkd's walks over a config).
    A malformed document raises ``tomllib.TOMLDecodeError`` as ``tomllib.loads`` does."""
    try:
        doc = tomllib.loads(text)
    except RecursionError:
        doc = None
    if doc is None or nesting_depth(doc) > MAX_DEPTH:
        raise ConfigError(f"{where} nests tables or arrays more than {MAX_DEPTH} deep, deeper than any config "
                          "needs; flatten it.")
    return doc


def merge_tables(base: dict, top: dict) -> dict:
    """A new dict: ``base`` with ``top`` on top. Tables present in both merge recursively; any other value
    of ``top`` (a number, a string, a list) replaces ``base``'s. Neither input is changed."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_tables(out[key], value)
        else:
            out[key] = value
    return out


def _parse(path: Path, shown: str) -> dict:
    """The TOML table in ``path``; errors name the file as ``shown``."""
    try:
        return parse_toml(path.read_text(encoding="utf-8"), f"config file '{shown}'")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file '{shown}' is not valid TOML: {exc}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file '{shown}' is not UTF-8 text; save it as a TOML text file.") from None


def _base_names(raw: dict, shown: str) -> list[str]:
    """The paths ``raw['extends']`` names, as a list (empty when the key is absent)."""
    names = raw.get(EXTENDS, [])
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"config '{shown}' has extends = {names!r}; write a path relative to this file, "
                          f"e.g. extends = \"_base.toml\", or a list of such paths.")
    return names


def _chain_text(chain: list[str]) -> str:
    return " -> ".join(chain)


def _resolve(path: Path, shown: str, chain: list[tuple[Path, str]]) -> dict:
    """``path``'s table with its bases merged in; ``chain`` holds the files that led here (outermost first)."""
    raw = _parse(path, shown)
    merged: dict = {}
    here = chain + [(path, shown)]
    for name in _base_names(raw, shown):
        base = Path(os.path.normpath(path.parent / name))
        base_shown = os.path.normpath(os.path.join(os.path.dirname(shown), name))
        names = [s for _, s in here] + [base_shown]
        again = [s for p, s in here if p.resolve() == base.resolve()]
        if again:
            raise ConfigError(f"config '{again[0]}' extends itself: {_chain_text(names)}; "
                              f"remove one of these extends.")
        if not base.is_file():
            via = f" (via {_chain_text(names)})" if len(names) > 2 else ""
            raise ConfigError(f"config '{shown}' extends '{base_shown}', which does not exist{via}; "
                              f"fix the path (it is relative to the file that names it).")
        merged = merge_tables(merged, _resolve(base, base_shown, here))
    own = {k: v for k, v in raw.items() if k != EXTENDS}
    return merge_tables(merged, own)


def read_config_file(path: str | Path) -> dict:
    """Read the TOML config at ``path`` and resolve its ``extends`` chain (see the module docstring).

    Returns a plain dict without ``extends``. A missing, malformed or non-UTF-8 file, a base that does not
    exist, an ``extends`` cycle or an ``extends`` that is not a path (or a list of paths) raises
    :class:`~fkd.errors.ConfigError` with one sentence naming the chain of files and the fix.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist; pass an existing file to --config (see configs/).")
    return _resolve(p, str(p), [])
