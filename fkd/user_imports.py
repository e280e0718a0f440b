"""``distill.imports``: load the user's own terms (or models, optimizers, data sets), nothing else.

Each entry is a Python file (``"my_terms.py"``, relative to the working directory like every path in
a config) or an importable module path (``"mylab.kd_terms"``). Importing runs that file's code: that
is the user's own choice, written in their own config, and fkd imports nothing else. A file is
imported once per process (under a private module name derived from its resolved path), so loading
the same config twice does not run it twice.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from fkd.errors import ConfigError, shorten
from fkd.schema import path_problem

_loaded: dict[str, ModuleType] = {}


def import_user_files(entries: list[str]) -> list[ModuleType]:
    """Import each file or module in ``entries`` (once); failures are one-sentence :class:`ConfigError`s.

    The files register what they define with the registries' decorators (``@register_term``,
    ``@MODELS.register``, ...), so a config can name it.
    """
    return [_import_one(entry) for entry in entries]


def _import_one(entry: str) -> ModuleType:
    if not isinstance(entry, str) or not entry.strip():
        raise ConfigError(f"distill.imports entries must be file paths or module names (got {entry!r}).")
    is_file = entry.endswith(".py") or "/" in entry or "\\" in entry
    if (problem := path_problem(entry)) is not None:
        raise ConfigError(f"distill.imports entry '{shorten(entry)}' {problem}; shorten the path.")
    if is_file:
        path = Path(entry).resolve()
        if not path.is_file():
            raise ConfigError(f"distill.imports names '{entry}', which is not a file; give the path of your "
                              "terms file relative to the working directory, or a module name.")
        cache_key = str(path)
    else:
        cache_key = entry
    if cache_key in _loaded:
        return _loaded[cache_key]
    try:
        module = _exec_file(path) if is_file else importlib.import_module(entry)
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        if not is_file and exc.name and entry.startswith(exc.name):
            raise ConfigError(f"distill.imports names module '{entry}', which cannot be found; install it or "
                              "give the path of a .py file.") from None
        raise ConfigError(f"importing '{entry}' (distill.imports) failed: {exc}.") from None
    except SystemExit as exc:  # the file ended the process while imported: say so instead of exiting silently
        raise ConfigError(f"importing '{shorten(entry, 300)}' (distill.imports) failed: it called sys.exit({exc.code!r}) "
                          "while being imported; remove that call from the file.") from None
    except Exception as exc:  # the user's code: report it in one line, whatever it raised
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"importing '{shorten(entry, 300)}' (distill.imports) failed: {type(exc).__name__}: "
                          f"{shorten(reason, 200)}.") from None
    _loaded[cache_key] = module
    return module


def _exec_file(path: Path) -> ModuleType:
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return exec_file_module(f"fkd_user_terms_{path.stem}_{digest}", path)


def exec_file_module(name: str, path: Path) -> ModuleType:
    """Import the Python file ``path`` as module ``name`` (registered in ``sys.modules`` unless it fails)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # attrs and typing resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
