"""Code that lives in a clone of the fkd repository but not in the installed package: ``bench/``.

The benchmark harness and its imperative baseline stay out of the ``fkd`` package on purpose (the
baseline registers forward hooks, which the package never does, and neither is library code). They are
loaded from the clone by path; from an installed wheel, where they are absent, the user is told so.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

from fkd.errors import FkdError
from fkd.user_imports import exec_file_module

REPOSITORY = Path(__file__).resolve().parents[1]


def load_clone_module(relative_path: str, what: str) -> ModuleType:
    """Import ``REPOSITORY / relative_path`` once (e.g. ``"bench/harness.py"``); :class:`FkdError` if absent."""
    path = REPOSITORY / relative_path
    name = "fkd_clone_" + relative_path.replace("/", "_").removesuffix(".py")
    if name in sys.modules:
        return sys.modules[name]
    if not path.is_file():
        raise FkdError(f"{what} ({relative_path}) is not part of an installed fkd, only of a clone of the "
                       f"repository; run it from a clone (git clone ... && python cli.py ...).")
    return exec_file_module(name, path)
